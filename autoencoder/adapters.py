"""Which weights of a backbone train: the frozen encoder, and a frozen, LoRA-tuned (PEFT) or fully
tuned decoder; for a causal LM only the layers above its ``context_layers`` (its encoder) are tuned."""

from __future__ import annotations

import re

import torch
from latentlm.autoencoder.backbones import BERT2BERT_NEW_MODULES, DECODER_MODES, backbone_family, decoder_layers
from latentlm.autoencoder.text_codec import decoder_stack_name, unwrap_peft

__all__ = ["configure_trainable", "default_lora_target_modules", "set_dropout"]


def default_lora_target_modules(language_model) -> str | list[str]:
    """The decoder attention projections per architecture: a regex (peft full-match) for seq2seq
    models, module names for a causal LM (restricted to its decoder layers by `configure_trainable`)."""
    family = backbone_family(language_model)
    if family == "bart":
        return r".*decoder\.layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|v_proj)"
    if family == "t5":
        return r".*decoder\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|v)"
    if family == "bert2bert":
        # Self-attention only: the new cross-attention is trained in full (modules_to_save).
        return r".*decoder\.bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"
    if family == "causal":
        names = {name.rsplit(".", 1)[-1] for name, _ in unwrap_peft(language_model).named_modules()}
        for candidates in (
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            ("c_attn", "c_proj"),
            ("query_key_value", "dense"),
        ):
            if set(candidates) <= names:
                return list(candidates)
        raise ValueError(
            "No default LoRA target modules for this causal LM; pass lora_target_modules=[...] (names of its "
            "attention projections)."
        )
    raise ValueError(
        f"No default LoRA target modules for model type {family!r}; pass lora_target_modules=[...] "
        f"(names of decoder linear layers, e.g. ['q_proj', 'v_proj'])."
    )


def _user_lora_target_regex(language_model, names) -> str:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("lora_target_modules is empty; give module names such as ['q_proj', 'v_proj'] or None.")
    alternatives = "|".join(re.escape(n) for n in names)
    # Only decoder modules (the encoder stays frozen); for BERT2BERT skip the cross-attention,
    # which is trained in full.
    exclude = r"(?!.*crossattention)" if backbone_family(language_model) == "bert2bert" else ""
    return rf"{exclude}.*decoder\..*\b({alternatives})"


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
    """Freeze the encoder; make the decoder frozen / LoRA-tuned / fully tuned.

    Returns the model (a `peft.PeftModel` for ``decoder="lora"``). Parameters shared with the
    encoder (tied embeddings) always stay frozen. For a causal LM the encoder is its embeddings and
    its first ``context_layers`` layers; only the layers above them are tuned.
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}.")
    model = language_model
    model.requires_grad_(False)
    family = backbone_family(model)
    if family == "causal":
        return _configure_causal(
            model,
            decoder,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules,
            context_layers=context_layers,
        )
    new_modules = BERT2BERT_NEW_MODULES if family == "bert2bert" else ()
    if decoder == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}.")
        target = (
            default_lora_target_modules(model)
            if lora_target_modules is None
            else _user_lora_target_regex(model, lora_target_modules)
        )
        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target,
            modules_to_save=list(new_modules) or None,
            task_type=TaskType.SEQ_2_SEQ_LM,
        )
        return get_peft_model(model, lora_config)
    if decoder == "full":
        encoder_params = {id(p) for p in model.get_encoder().parameters()}
        for p in model.parameters():
            if id(p) not in encoder_params:
                p.requires_grad_(True)
    for name, module in model.named_modules():
        if name.startswith("decoder.") and any(name.endswith(m) for m in new_modules):
            module.requires_grad_(True)
    return model


def _configure_causal(
    model, decoder: str, *, lora_r: int, lora_alpha: int, lora_dropout: float, lora_target_modules, context_layers: int
):
    layers = decoder_layers(model)
    if not 0 <= context_layers < len(layers):
        raise ValueError(
            f"context_layers={context_layers}: a causal LM with {len(layers)} layers can lend 0 to "
            f"{len(layers) - 1} of them to the encoder (at least one must stay for the decoder)."
        )
    tuned = list(range(context_layers, len(layers)))
    if decoder == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}.")
        if lora_target_modules is None:
            target = default_lora_target_modules(model)
        else:
            target = [lora_target_modules] if isinstance(lora_target_modules, str) else list(lora_target_modules)
            if not target:
                raise ValueError(
                    "lora_target_modules is empty; give module names such as ['q_proj', 'v_proj'] or None."
                )
        pattern = decoder_stack_name(unwrap_peft(model).base_model)
        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target,
            layers_to_transform=tuned,
            layers_pattern=pattern,
            task_type=TaskType.CAUSAL_LM,
        )
        return get_peft_model(model, lora_config)
    if decoder == "full":
        embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
        frozen = {id(p) for i in range(context_layers) for p in layers[i].parameters()} | embedding_ids
        for p in model.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)
    return model


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
