"""Text <-> latents with a PLM (encoder + decoder) and a `LatentAutoencoder`.

Shared by `latentlm.TextAutoencoder` and the diffusion pipeline, so both encode and decode the
same way. `language_model` is any transformers seq2seq model (BART, T5, `EncoderDecoderModel`)
or a `peft.PeftModel` wrapping one.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "GREEDY_GENERATE_KWARGS",
    "check_texts",
    "tokenize_texts",
    "encoder_hidden_states",
    "encode_texts",
    "decode_latents",
]

# LD4LG decoding defaults.
DEFAULT_GENERATE_KWARGS: dict[str, Any] = dict(
    num_beams=4, no_repeat_ngram_size=3, repetition_penalty=1.2, min_length=5, max_length=64
)
# Plain greedy decoding (fast; what exact-match evaluation of short texts usually wants).
GREEDY_GENERATE_KWARGS: dict[str, Any] = dict(
    num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0, max_length=64
)


def check_texts(texts) -> list[str]:
    """Validate a batch of texts: a non-empty list of non-empty strings."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single string; wrap it: [text].")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one string.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str.")
        if not text.strip():
            raise ValueError(f"texts[{i}] is an empty string; remove empty texts before encoding.")
    return texts


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def tokenize_texts(tokenizer, texts: list[str], max_length: int, device=None) -> dict[str, torch.Tensor]:
    """Tokenize with padding and truncation at `max_length` -> {input_ids, attention_mask} [B, L]."""
    texts = check_texts(texts)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: batch[k].to(device) if device is not None else batch[k] for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def encoder_hidden_states(language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The (frozen) PLM encoder's last hidden states [B, L, d_model]."""
    encoder = language_model.get_encoder()
    return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


@torch.no_grad()
def encode_texts(tokenizer, language_model, autoencoder, texts: list[str], max_length: int) -> torch.Tensor:
    """texts -> latents [B, num_latents, latent_dim]."""
    batch = tokenize_texts(tokenizer, texts, max_length, device=_device_of(autoencoder))
    hidden = encoder_hidden_states(language_model, batch["input_ids"], batch["attention_mask"])
    return autoencoder.compress(hidden, batch["attention_mask"])


@torch.no_grad()
def decode_latents(tokenizer, language_model, autoencoder, latents: torch.Tensor, **generate_kwargs) -> list[str]:
    """latents [B, num_latents, latent_dim] -> texts, through the PLM decoder's own `generate()`.

    `generate_kwargs` override `DEFAULT_GENERATE_KWARGS` (pass ``num_beams=1`` etc. for greedy).
    """
    if not torch.is_tensor(latents) or latents.dim() != 3:
        raise ValueError(
            "latents must be a tensor of shape [batch, num_latents, latent_dim], got "
            f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}."
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf values; cannot decode them.")
    latents = latents.to(_device_of(autoencoder))
    memory = autoencoder.reconstruct(latents)
    kwargs = {**DEFAULT_GENERATE_KWARGS, **generate_kwargs}
    # Generating past the decoder's learned positions raises an IndexError deep inside generate();
    # stop at the last position instead, and say so.
    decoder_config = getattr(language_model.config, "decoder", None) or language_model.config
    max_positions = getattr(decoder_config, "max_position_embeddings", None)
    if max_positions is not None and kwargs.get("max_length", 0) > max_positions:
        warnings.warn(
            f"max_length={kwargs['max_length']} exceeds the decoder's {max_positions} position embeddings; "
            f"generating at most {max_positions} tokens.",
            stacklevel=2,
        )
        kwargs["max_length"] = max_positions
    mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
    output_ids = language_model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, **kwargs
    )
    texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]
