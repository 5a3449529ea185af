"""Which weights of a backbone train: the frozen encoder, and a frozen, LoRA-tuned (PEFT) or fully
tuned decoder; for a causal LM only the layers above its ``context_layers`` (its encoder) are tuned."""

from __future__ import annotations

import torch
from latentlm.autoencoder.families import DECODER_MODES, family_of

__all__ = ["configure_trainable", "set_dropout"]


def configure_trainable(
    language_model,
    decoder: str = "frozen",
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules=None,
    context_layers: int = 0,
):
    """Freeze the encoder; make the decoder frozen / LoRA-tuned / fully tuned, as the model's family
    does it (`latentlm.autoencoder.families`).

    Returns the model (a `peft.PeftModel` for ``decoder="lora"``). Parameters shared with the
    encoder (tied embeddings) always stay frozen. For a causal LM the encoder is its embeddings and
    its first ``context_layers`` layers; only the layers above them are tuned.
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}.")
    language_model.requires_grad_(False)
    return family_of(language_model).configure_trainable(
        language_model,
        decoder,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules,
        context_layers=context_layers,
    )


def set_dropout(language_model, p: float) -> None:
    """Set every dropout probability of the language model to `p` (e.g. 0 for reconstruction)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {p}.")
    for module in language_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = language_model.config
    for cfg in (config, getattr(config, "encoder", None), getattr(config, "decoder", None)):
        if cfg is None:
            continue
        for key in (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "dropout_rate",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
        ):
            if hasattr(cfg, key):
                setattr(cfg, key, p)
