"""Text <-> latents with a PLM (encoder + decoder) and a `LatentAutoencoder`.

Shared by `latentlm.TextAutoencoder` and the diffusion pipeline, so both encode and decode the
same way. `language_model` is any transformers seq2seq model (BART, T5, `EncoderDecoderModel`),
a decoder-only causal LM (GPT-2, Llama, SmolLM, ...), or a `peft.PeftModel` wrapping one.

Seq2seq: the encoder's last states are compressed; the reconstructed memory is what the decoder
cross-attends to. Causal LM: the LM is its own encoder (its states after the autoencoder's
``context_layers`` layers are compressed) and the reconstructed memory is a soft prompt: input
embeddings placed where ``{memory}`` stands in the autoencoder's ``prompt_template``, e.g.
``"Repeat this text exactly:\n{memory}\n"``, after which the LM writes the text and its
end-of-text token.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from latentlm.autoencoder.families import family_of
from latentlm.autoencoder.model_parts import unwrap_peft

__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "GREEDY_GENERATE_KWARGS",
    "check_texts",
    "tokenize_texts",
    "encoder_hidden_states",
    "encode_texts",
    "encode_sources",
    "source_length_limit",
    "tokenize_contexts",
    "decode_latents",
    "merge_peft",
]

# LD4LG decoding defaults.
DEFAULT_GENERATE_KWARGS: dict[str, Any] = dict(
    num_beams=4, no_repeat_ngram_size=3, repetition_penalty=1.2, min_length=5, max_length=64
)
# Plain greedy decoding (fast; what exact-match evaluation of short texts usually wants).
GREEDY_GENERATE_KWARGS: dict[str, Any] = dict(
    num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0, max_length=64
)


def check_texts(texts, name: str = "texts") -> list[str]:
    """Validate a batch of texts: a non-empty list of non-empty strings (``name`` is used in errors)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, got a single string; wrap it: [text].")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty; pass at least one string.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str.")
        if not text.strip():
            raise ValueError(f"{name}[{i}] is an empty string; remove empty texts before encoding.")
    return texts


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def tokenize_texts(
    tokenizer, texts: list[str], max_length: int, device=None, *, add_special_tokens: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize with padding and truncation at `max_length` -> {input_ids, attention_mask} [B, L].

    Texts longer than `max_length` tokens are cut there, with a warning naming how many.
    ``add_special_tokens=False`` for causal LMs: a text is its own tokens (the end-of-text token
    is the decoder's target, not part of the encoder's input).
    """
    texts = check_texts(texts)
    full = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    too_long = sum(len(ids) > max_length for ids in full)
    if too_long:
        warnings.warn(
            f"{too_long} of {len(texts)} texts are longer than max_length={max_length} tokens and are cut to it; "
            f"their reconstructions end there.",
            stacklevel=3,
        )
    batch = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=add_special_tokens,
    )
    return {k: batch[k].to(device) if device is not None else batch[k] for k in ("input_ids", "attention_mask")}


def merge_peft(language_model):
    """A `peft.PeftModel` -> a merged copy as a plain transformers model; any other model as it is."""
    from peft import PeftModel

    if isinstance(language_model, PeftModel):
        return copy.deepcopy(language_model).merge_and_unload()
    return language_model


@torch.no_grad()
def encoder_hidden_states(
    language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_layers: int = 0
) -> torch.Tensor:
    """The (frozen) encoder's states [B, L, d_model], as the backbone's family reads them
    (`BackboneFamily.encoder_states`): a seq2seq encoder's last states, or a causal LM's states after
    its first ``context_layers`` layers."""
    return family_of(language_model).encoder_states(language_model, input_ids, attention_mask, context_layers)


@torch.no_grad()
def encode_texts(tokenizer, language_model, autoencoder, texts: list[str], max_length: int) -> torch.Tensor:
    """texts -> latents [B, num_latents, latent_dim]."""
    special = family_of(language_model).add_special_tokens
    batch = tokenize_texts(tokenizer, texts, max_length, device=_device_of(autoencoder), add_special_tokens=special)
    hidden = encoder_hidden_states(
        language_model, batch["input_ids"], batch["attention_mask"], autoencoder.config.get("context_layers") or 0
    )
    return autoencoder.compress(hidden, batch["attention_mask"])


def source_length_limit(tokenizer, language_model) -> int | None:
    """The most tokens the encoder reads: its position embeddings, or the tokenizer's limit (None = no limit)."""
    config = unwrap_peft(language_model).config
    config = getattr(config, "encoder", None) or config
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [int(limit) for limit in limits if limit]
    return min(limits) if limits else None


@torch.no_grad()
def encode_sources(
    tokenizer, language_model, autoencoder, texts: list[str], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source texts -> the frozen encoder's states [B, L, d_model] and attention mask [B, L] (text-to-text).

    The states are those the autoencoder compresses (`encoder_hidden_states`), uncompressed: the
    denoiser cross-attends to them. A source longer than the encoder reads is an error, never cut.
    """
    texts = check_texts(texts)
    special = family_of(language_model).add_special_tokens
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=special)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    limit = source_length_limit(tokenizer, language_model)
    too_long = [i for i, length in enumerate(lengths) if limit is not None and length > limit]
    if too_long:
        raise ValueError(
            f"{len(too_long)} source texts are longer than the encoder reads ({limit} tokens): source "
            f"{too_long[0]} has {lengths[too_long[0]]} tokens. Shorten or split them; sources are never cut."
        )
    device = device if device is not None else _device_of(autoencoder)
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    states = encoder_hidden_states(language_model, input_ids, mask, autoencoder.config.get("context_layers") or 0)
    return states, mask


def tokenize_contexts(
    tokenizer, texts: list[str], device=None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts a ``read_context`` decoder reads before the latents' prompt: ids and mask [B, C],
    left-padded (so every row's prompt ends at the same place), without special tokens. An empty
    context is no token; a context is never cut: one longer than ``limit`` tokens is an error."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError(f"contexts must be a list of strings, got {texts!r:.80}.")
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    too_long = [i for i, row in enumerate(rows) if limit is not None and len(row) > limit]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{len(too_long)} contexts are longer than the {limit} tokens the LM has room for before the latents' "
            f"prompt and the text, e.g. context {i} ({len(rows[i])} tokens: {texts[i][:60]!r}); contexts are never "
            "cut: shorten them."
        )
    width = max((len(row) for row in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long).reshape(len(rows), width)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids.to(device), mask.reshape(len(rows), width).to(device)


@torch.no_grad()
def decode_latents(
    tokenizer,
    language_model,
    autoencoder,
    latents: torch.Tensor,
    context_texts: list[str] | None = None,
    **generate_kwargs,
) -> list[str]:
    """latents [B, num_latents, latent_dim] -> texts, through the PLM decoder's own `generate()`.

    `generate_kwargs` override `DEFAULT_GENERATE_KWARGS` (pass ``num_beams=1`` etc. for greedy).
    ``context_texts`` (one per row): the text a decoder tuned with ``read_context`` reads before the
    latents' prompt (without them it reads the prompt alone). For such a decoder
    ``encoder_no_repeat_ngram_size=n`` keeps the text from repeating any n tokens of its context, as
    `generate()` does with an encoder's input (no context: nothing is banned).
    """
    if not torch.is_tensor(latents) or latents.dim() != 3:
        raise ValueError(
            "latents must be a tensor of shape [batch, num_latents, latent_dim], got "
            f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}."
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf values; cannot decode them.")
    if generate_kwargs.get("encoder_no_repeat_ngram_size") and not autoencoder.config.get("read_context"):
        raise ValueError(
            "encoder_no_repeat_ngram_size bans the n-grams of the context a read_context decoder reads "
            "(decoder_tuning.read_context: true); this decoder reads no context: use no_repeat_ngram_size."
        )
    context = None
    if context_texts is not None:
        if not autoencoder.config.get("read_context"):
            raise ValueError(
                "context_texts are for a decoder tuned to read a context (decoder_tuning.read_context: true); "
                "this one reads the latents alone: drop context_texts."
            )
        if len(context_texts) != len(latents):
            raise ValueError(f"{len(context_texts)} context_texts for {len(latents)} latents: give one per row.")
        context = tokenize_contexts(tokenizer, context_texts, _device_of(autoencoder))
    latents = latents.to(_device_of(autoencoder))
    memory = autoencoder.reconstruct(latents)
    kwargs = {**DEFAULT_GENERATE_KWARGS, **generate_kwargs}
    return family_of(language_model).generate(tokenizer, language_model, autoencoder, memory, kwargs, context)
