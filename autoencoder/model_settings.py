"""The nested model settings of a `TextAutoencoder` (a run config's ``autoencoder.model``): building its
`LatentAutoencoder` from them, and reading them back from a built model to compare.

The shape: ``backbone``, ``decoder``, ``max_length``, ``lora: {r, alpha, dropout, target_modules}``,
``causal: {context_layers, prompt_template, memory}`` and the `LatentAutoencoder` arguments by name
(``num_latents``, ``latent_dim``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from latentlm.autoencoder.backbones import attention_shape
from latentlm.autoencoder.modeling_latent_autoencoder import LatentAutoencoder

__all__ = [
    "AUTOENCODER_SETTINGS",
    "backbone_arguments",
    "latent_autoencoder_for",
    "settings_mismatch",
    "stored_backbone",
]

#: the arguments of `TextAutoencoder.from_backbone` that shape its `LatentAutoencoder`
AUTOENCODER_SETTINGS = (
    "max_length",
    "normalize_latents",
    "variational",
    "context_positions",
    "memory_tokens_per_latent",
    "query_init_std",
    "context_layers",
    "tokens_per_query",
    "num_latents",
    "latent_dim",
    "head_dim",
    "ff_mult",
    "dropout",
    "num_compression_layers",
    "num_reconstruction_layers",
)
# settings that shape how the model is built or trained, not what it is: never compared
_NOT_RECORDED = ("cross_attention_init", "plm_dropout")


def stored_backbone(backbone: str) -> str:
    """How a backbone is recorded with the model: a local folder as an absolute path (the saved model
    then loads from any directory), a name or hub id as given."""
    return os.path.abspath(backbone) if os.path.isdir(str(backbone)) else str(backbone)


def backbone_arguments(settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Nested model settings -> ``(backbone, keyword arguments of TextAutoencoder.from_backbone)``."""
    flat = dict(settings)
    if "backbone" not in flat:
        raise ValueError("The model settings name no 'backbone' (a hub id, a local folder or a builtin name).")
    lora, causal = flat.pop("lora", None) or {}, flat.pop("causal", None) or {}
    flat.update({f"lora_{key}": value for key, value in lora.items()})
    flat.update({"causal_memory" if key == "memory" else key: value for key, value in causal.items()})
    return flat.pop("backbone"), flat


def latent_autoencoder_for(
    family,
    language_model,
    *,
    max_length: int,
    causal_memory: str,
    normalize_latents,
    context_positions: int,
    **settings,
) -> LatentAutoencoder:
    """A new compression/reconstruction network for a backbone of ``family`` (the other ``settings`` are
    `LatentAutoencoder` arguments)."""
    key_value_shape = attention_shape(language_model) if causal_memory == "key_value_prefix" else {}
    autoencoder = LatentAutoencoder(
        d_model=family.encoder_hidden_size(language_model),
        normalize_latents=family.normalize_latents if normalize_latents is None else normalize_latents,
        context_positions=max_length if context_positions == -1 else context_positions,
        **settings,
        **key_value_shape,
    )
    if family.is_causal and not key_value_shape:
        # the soft prompt stands in for input embeddings: start its norm at theirs
        embeddings = language_model.get_input_embeddings().weight
        with torch.no_grad():
            autoencoder.reconstruction_norm.weight.fill_(
                float(embeddings.norm(dim=-1).mean()) / autoencoder.memory_dim**0.5
            )
    return autoencoder


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings_of(model) -> dict[str, Any]:
    """What the `TextAutoencoder` ``model`` was built from, in the nested shape, as resolved when built."""
    built = dict(model.autoencoder.config)
    return {
        "backbone": model.backbone,
        "decoder": model.decoder_mode,
        "max_length": model.max_length,
        "lora": dict(model.lora) if model.decoder_mode == "lora" else {},
        "causal": {
            "context_layers": built["context_layers"],
            "prompt_template": built["prompt_template"],
            "memory": "key_value_prefix" if built["key_value_layers"] else "soft_prompt",
        },
        **{key: built[key] for key in AUTOENCODER_SETTINGS if key in built and key not in ("context_layers",)},
    }


def settings_mismatch(settings: Mapping[str, Any], model) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (asked, built)}`` for every setting in ``settings`` (nested) that the built
    `TextAutoencoder` ``model`` does not have. A setting left to its default (``null``
    ``normalize_latents`` or ``causal.prompt_template``) matches what the default resolved to;
    ``context_positions: -1`` means ``max_length``; LoRA settings count only for ``decoder: lora``."""
    asked = _flatten(settings)
    asked["backbone"] = stored_backbone(asked["backbone"])
    if asked.get("context_positions") == -1:
        asked["context_positions"] = asked["max_length"]
    built = _flatten(_settings_of(model))
    skip = set(_NOT_RECORDED) | {k for k in ("normalize_latents", "causal.prompt_template") if asked.get(k) is None}
    if asked.get("decoder") != "lora":
        skip |= {key for key in asked if key.startswith("lora.")}
    return {key: (value, built.get(key)) for key, value in asked.items() if key not in skip and built.get(key) != value}
