"""Where the parts of a transformers language model are, under an optional `peft.PeftModel` wrapper:
the model itself, whether it is decoder-only, and a causal LM's body and transformer blocks. The
backbone families, the losses and the decoding all read models through these."""

from __future__ import annotations

import torch

__all__ = ["cache_argument", "causal_body", "decoder_layers", "decoder_stack_name", "is_causal_lm", "unwrap_peft"]


def unwrap_peft(language_model):
    """The transformers model under an optional `peft.PeftModel` wrapper (the same object, not a copy)."""
    from peft import PeftModel

    return language_model.get_base_model() if isinstance(language_model, PeftModel) else language_model


def is_causal_lm(language_model) -> bool:
    """True for a decoder-only LM (or a `peft.PeftModel` wrapping one)."""
    config = unwrap_peft(language_model).config
    return not getattr(config, "is_encoder_decoder", False) and config.model_type != "encoder-decoder"


def decoder_stack_name(body) -> str:
    """Attribute of a causal LM's body holding its blocks: ``layers`` (Llama-likes), ``h`` (GPT-2), ``blocks``."""
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(body, name, None), torch.nn.ModuleList):
            return name
    raise ValueError(f"Cannot find the transformer blocks of {type(body).__name__} (looked for layers, h, blocks).")


def causal_body(language_model):
    """The transformers model under an optional PeftModel wrapper, and its decoder stack."""
    model = unwrap_peft(language_model)
    return model, model.base_model


def decoder_layers(language_model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (``model.layers`` for Llama-likes, ``transformer.h`` for GPT-2)."""
    body = unwrap_peft(language_model).base_model
    return getattr(body, decoder_stack_name(body))


def cache_argument(model, cache) -> dict:
    """``{name: cache}`` for a transformers model's forward and ``generate()``: ``cache`` where the
    model takes it (transformers 5.25 deprecates ``past_key_values``), else ``past_key_values``."""
    import inspect

    forward = inspect.signature(type(unwrap_peft(model)).forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache}
