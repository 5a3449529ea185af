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
from latentlm.autoencoder.families.base import decoder_stack_name, is_causal_lm, unwrap_peft
from transformers.modeling_outputs import BaseModelOutput

__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "GREEDY_GENERATE_KWARGS",
    "check_texts",
    "tokenize_texts",
    "encoder_hidden_states",
    "encode_texts",
    "encode_sources",
    "source_length_limit",
    "decode_latents",
    "soft_prompt_inputs",
    "key_value_prefix_inputs",
    "uses_key_value_prefix",
    "MEMORY_PLACEHOLDER",
    "merge_peft",
]

MEMORY_PLACEHOLDER = "{memory}"

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


def causal_body(language_model):
    """The transformers model under an optional PeftModel wrapper, and its decoder stack."""
    model = unwrap_peft(language_model)
    return model, model.base_model


@torch.no_grad()
def encoder_hidden_states(
    language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_layers: int = 0
) -> torch.Tensor:
    """The (frozen) encoder's states [B, L, d_model].

    Seq2seq: the encoder's last hidden states. Causal LM: the states after its first
    ``context_layers`` layers (with the final norm), or its input embeddings for 0. Those layers
    are never tuned (`latentlm.autoencoder.adapters.configure_trainable`), so LoRA adapters leave them as is.
    """
    if not is_causal_lm(language_model):
        encoder = language_model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    model, body = causal_body(language_model)
    if context_layers == 0:
        return model.get_input_embeddings()(input_ids)
    # A shallow copy of the decoder stack that runs only its lowest layers: same weights, no
    # mutation of the shared model (safe under concurrent calls).
    name = decoder_stack_name(body)
    lower = copy.copy(body)
    lower._modules = dict(body._modules)
    lower._modules[name] = torch.nn.ModuleList(list(getattr(body, name))[:context_layers])
    return lower(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True
    ).last_hidden_state


@torch.no_grad()
def encode_texts(tokenizer, language_model, autoencoder, texts: list[str], max_length: int) -> torch.Tensor:
    """texts -> latents [B, num_latents, latent_dim]."""
    causal = is_causal_lm(language_model)
    batch = tokenize_texts(tokenizer, texts, max_length, device=_device_of(autoencoder), add_special_tokens=not causal)
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
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not is_causal_lm(language_model))
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


def _prompt_ids(tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    """Token ids before and after ``{memory}`` in the prompt template."""
    if not template or template.count(MEMORY_PLACEHOLDER) != 1:
        raise ValueError(
            f"A causal LM reads the latents through a prompt template with exactly one {MEMORY_PLACEHOLDER!r}, got "
            f"{template!r}; set the autoencoder's prompt_template."
        )
    before, after = template.split(MEMORY_PLACEHOLDER)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    return encode(before), encode(after)


def soft_prompt_inputs(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, text_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Input embeddings [B, T, H] of ``prompt_before + memory + prompt_after (+ text_ids)``."""
    model, _ = causal_body(language_model)
    embed = model.get_input_embeddings()
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    b, device = memory.shape[0], memory.device
    pieces = []
    if before:
        pieces.append(embed(torch.tensor(before, device=device)).expand(b, -1, -1))
    pieces.append(memory.to(embed.weight.dtype))
    if after:
        pieces.append(embed(torch.tensor(after, device=device)).expand(b, -1, -1))
    if text_ids is not None:
        pieces.append(embed(text_ids))
    return torch.cat(pieces, dim=1)


def uses_key_value_prefix(autoencoder) -> bool:
    """Whether a decoder-only LM reads this autoencoder's memory as a key/value prefix (else a soft prompt)."""
    return bool(autoencoder.config.get("key_value_layers"))


def key_value_prefix_inputs(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, text_ids: torch.Tensor | None = None, repeats: int = 1
):
    """The key/value prefix route: ``(cache, input_ids)``.

    ``cache`` (a transformers ``DynamicCache``) holds the keys and values of the prompt before
    ``{memory}`` (computed by the LM) followed by the prefix `LatentAutoencoder.key_values` writes,
    each batch row repeated ``repeats`` times (beams); ``input_ids`` [B, T] (not repeated) is the
    prompt after ``{memory}`` (+ ``text_ids``), what the LM reads next, at positions after the cache.
    """
    from transformers import DynamicCache

    model, body = causal_body(language_model)
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    if not after:
        raise ValueError(
            "A key/value prefix needs at least one prompt token after {memory} (the LM predicts the text's first "
            f"token from it); prompt_template={autoencoder.config.get('prompt_template')!r}."
        )
    b, device = memory.shape[0] * repeats, memory.device
    cache = DynamicCache(config=model.config)
    if before:
        body(input_ids=torch.tensor([before], device=device).expand(b, -1), past_key_values=cache, use_cache=True)
    # The cache must hold what the attention layers compute: under autocast, its dtype.
    param = next(model.parameters())
    dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) else param.dtype
    for layer, (keys, values) in enumerate(autoencoder.key_values(memory)):
        keys, values = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
        cache.update(keys.to(dtype), values.to(dtype), layer)
    input_ids = torch.tensor([after], device=device).expand(memory.shape[0], -1)
    if text_ids is not None:
        input_ids = torch.cat([input_ids, text_ids], dim=1)
    return cache, input_ids


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
    if is_causal_lm(language_model):
        return _generate_causal(tokenizer, language_model, autoencoder, memory, kwargs)
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
    # The language model may be in another dtype than the autoencoder (bf16 LM, fp32 autoencoder).
    memory = memory.to(next(language_model.parameters()).dtype)
    output_ids = language_model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, **kwargs
    )
    texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]


def _generate_causal(tokenizer, language_model, autoencoder, memory: torch.Tensor, kwargs: dict) -> list[str]:
    """The LM's ``generate()`` after the latents' prompt, computed once per batch (beams and sampled
    sequences share it): ``inputs_embeds`` for a soft prompt, ``past_key_values`` for a key/value
    prefix. ``max_length`` / ``min_length`` count the text's tokens, as for seq2seq decoders."""
    kwargs = dict(kwargs)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if not uses_key_value_prefix(autoencoder):
        inputs = soft_prompt_inputs(tokenizer, language_model, autoencoder, memory)
        kwargs = _text_length_kwargs(language_model, kwargs, inputs.shape[1])
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        output_ids = language_model.generate(inputs_embeds=inputs, attention_mask=mask, **kwargs)
    else:
        # generate() repeats its inputs per beam (or per returned sample) but not a cache: repeat it here.
        repeats = (
            kwargs.get("num_beams", 1) if kwargs.get("num_beams", 1) > 1 else kwargs.get("num_return_sequences", 1)
        )
        cache, after = key_value_prefix_inputs(tokenizer, language_model, autoencoder, memory, repeats=repeats)
        past = cache.get_seq_length()
        kwargs = _text_length_kwargs(language_model, kwargs, past + after.shape[1])
        # generate() takes embeddings of the whole sequence and reads those past the cache: the cached
        # positions get placeholders, so repetition penalties see only the generated text, as with a soft prompt.
        embeds = causal_body(language_model)[0].get_input_embeddings()(after)
        inputs = torch.cat([embeds.new_zeros(embeds.shape[0], past, embeds.shape[2]), embeds], dim=1)
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        output_ids = language_model.generate(inputs_embeds=inputs, attention_mask=mask, past_key_values=cache, **kwargs)
    texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]


def _text_length_kwargs(language_model, kwargs: dict, prompt_length: int) -> dict:
    """``max_length`` / ``min_length`` (text tokens, as for seq2seq decoders) -> ``max_new_tokens`` /
    ``min_new_tokens``, capped by the LM's positions after a prompt of ``prompt_length``."""
    if "max_new_tokens" not in kwargs:
        kwargs["max_new_tokens"] = kwargs.pop("max_length")
    kwargs.pop("max_length", None)
    kwargs.setdefault("min_new_tokens", kwargs.pop("min_length", 0))
    kwargs.pop("min_length", None)
    max_positions = getattr(language_model.config, "max_position_embeddings", None) or getattr(
        language_model.config, "n_positions", None
    )
    room = None if max_positions is None else max_positions - prompt_length
    if room is not None and kwargs["max_new_tokens"] > room:
        if room < 1:
            raise ValueError(f"The prompt ({prompt_length} positions) leaves no room in the LM's {max_positions}.")
        warnings.warn(
            f"max_length={kwargs['max_new_tokens']} does not fit after the {prompt_length}-position prompt "
            f"in the LM's {max_positions} positions; generating at most {room} tokens.",
            stacklevel=4,
        )
        kwargs["max_new_tokens"] = room
    return kwargs
