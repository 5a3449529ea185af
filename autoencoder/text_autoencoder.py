"""TextAutoencoder: tokenizer + pretrained LM (seq2seq or decoder-only, + PEFT) + LatentAutoencoder.

Its folder (`save_pretrained` / `from_pretrained`) is described in
`latentlm.autoencoder.text_autoencoder_folder`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from latentlm.autoencoder import LatentAutoencoder
from latentlm.autoencoder.backbones import CAUSAL_MEMORY, encoder_hidden_size, load_backbone, prompt_template_for
from latentlm.autoencoder.causal_decoding import uses_key_value_prefix
from latentlm.autoencoder.families import family_of
from latentlm.autoencoder.losses import alignment_loss, gaussian_kl
from latentlm.autoencoder.model_settings import (
    AUTOENCODER_SETTINGS,
    backbone_arguments,
    latent_autoencoder_for,
    stored_backbone,
)
from latentlm.autoencoder.text_autoencoder_folder import load_text_autoencoder_parts, save_text_autoencoder
from latentlm.autoencoder.text_codec import (
    decode_latents,
    encode_sources,
    encode_texts,
    encoder_hidden_states,
    merge_peft,
    tokenize_texts,
)
from torch import nn

__all__ = ["TextAutoencoder"]


class TextAutoencoder(nn.Module):
    """Texts <-> latents [B, num_latents, latent_dim] through a frozen PLM encoder and its decoder.

    Attributes: ``tokenizer``, ``language_model`` (transformers seq2seq model or PeftModel),
    ``autoencoder`` (`LatentAutoencoder`), ``max_length`` (tokens kept per text).
    """

    def __init__(
        self,
        tokenizer,
        language_model,
        autoencoder: LatentAutoencoder,
        max_length: int = 64,
        backbone: str | None = None,
        decoder: str = "frozen",
        lora: dict | None = None,
        alignment_weight: float = 0.0,
        latent_noise_std: float = 0.0,
        kl_weight: float = 0.0,
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}.")
        d_model = encoder_hidden_size(language_model)
        if autoencoder.config.d_model != d_model:
            raise ValueError(
                f"The autoencoder was built for d_model={autoencoder.config.d_model} but the backbone's encoder "
                f"states have size {d_model}; build the autoencoder with d_model={d_model}."
            )
        self.family = family_of(language_model)
        if self.causal:
            if autoencoder.config.prompt_template is None:
                raise ValueError(
                    "A decoder-only LM reads the latents through a prompt: build the autoencoder with "
                    "prompt_template='...{memory}...'."
                )
            budget = autoencoder.config.num_latents * autoencoder.config.tokens_per_query
            if autoencoder.config.tokens_per_query and max_length > budget:
                raise ValueError(
                    f"max_length={max_length} exceeds what the latents read: num_latents x tokens_per_query = "
                    f"{budget} tokens. Lower max_length or raise tokens_per_query."
                )
        if alignment_weight < 0:
            raise ValueError(f"alignment_weight must be >= 0, got {alignment_weight}.")
        if alignment_weight and not self.causal:
            raise ValueError(
                "alignment_weight pulls soft-prompt slots towards token embeddings, which only a decoder-only LM "
                "reads: set alignment_weight to 0 for an encoder-decoder backbone."
            )
        if alignment_weight and uses_key_value_prefix(autoencoder):
            raise ValueError(
                "alignment_weight pulls soft-prompt slots towards token embeddings, but this autoencoder writes a "
                "key/value prefix (causal_memory='key_value_prefix'): set alignment_weight to 0."
            )
        if latent_noise_std < 0:
            raise ValueError(f"latent_noise_std must be >= 0, got {latent_noise_std}.")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        if kl_weight and not autoencoder.config.get("variational"):
            raise ValueError(
                "kl_weight penalises the spread of a variational posterior, but this autoencoder writes plain "
                "latents: build it with variational=True, or set kl_weight to 0."
            )
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.autoencoder = autoencoder
        self.max_length = int(max_length)
        self.alignment_weight = float(alignment_weight)
        self.latent_noise_std = float(latent_noise_std)
        self.kl_weight = float(kl_weight)
        self.backbone = backbone
        self.decoder_mode = decoder
        self.lora = dict(lora or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        *,
        decoder: str = "frozen",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules=None,
        num_latents: int = 32,
        latent_dim: int = 64,
        num_compression_layers: int = 3,
        num_reconstruction_layers: int = 3,
        head_dim: int = 64,
        ff_mult: int = 4,
        normalize_latents: bool | None = None,
        dropout: float = 0.0,
        max_length: int = 64,
        cross_attention_init: str = "self_attention",
        plm_dropout: float | None = None,
        context_positions: int = 0,
        query_init_std: float = 0.02,
        memory_tokens_per_latent: int = 1,
        tokens_per_query: int = 0,
        context_layers: int = 0,
        prompt_template: str | None = None,
        alignment_weight: float = 0.0,
        causal_memory: str = "soft_prompt",
        latent_noise_std: float = 0.0,
        variational: bool = False,
        kl_weight: float = 0.0,
    ) -> TextAutoencoder:
        """A new (untrained) autoencoder over a backbone (see `latentlm.autoencoder.backbones.load_backbone`).

        ``normalize_latents=None``: the family's default (off for T5, on otherwise: LD4LG).
        ``context_positions=-1``: one learned position embedding per token of ``max_length`` (see
        `LatentAutoencoder`). Decoder-only backbones read the latents as a soft prompt in
        ``prompt_template`` or a key/value prefix (``causal_memory``), with the LM's first
        ``context_layers`` layers as the encoder (`latentlm.autoencoder.families.causal_lm`);
        ``alignment_weight`` > 0 pulls soft-prompt slot j towards the embedding of token j.
        ``latent_noise_std`` > 0: in training the decoder reads ``latents + latent_noise_std * ε``, so
        it learns to write fluent text from the imperfect latents a denoiser samples.
        ``variational=True``: the latents are a posterior mean and the decoder reads samples of the
        posterior in training, their spread held up by ``kl_weight`` x `losses.gaussian_kl`.
        """
        settings = {name: value for name, value in locals().items() if name in AUTOENCODER_SETTINGS}
        if causal_memory not in CAUSAL_MEMORY:
            raise ValueError(f"causal_memory={causal_memory!r}: use one of {list(CAUSAL_MEMORY)}.")
        lora = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
        tokenizer, language_model = load_backbone(
            backbone,
            decoder=decoder,
            **{f"lora_{key}": value for key, value in lora.items()},
            cross_attention_init=cross_attention_init,
            plm_dropout=plm_dropout,
            context_layers=context_layers,
        )
        family = family_of(language_model)
        causal_only = dict(context_layers=context_layers, tokens_per_query=tokens_per_query)
        family.check_settings(
            backbone, prompt_template=prompt_template, causal_memory=causal_memory != "soft_prompt", **causal_only
        )
        if family.is_causal and prompt_template is None:
            prompt_template = prompt_template_for(backbone, tokenizer)
        autoencoder = latent_autoencoder_for(
            family, language_model, causal_memory=causal_memory, prompt_template=prompt_template, **settings
        )
        return cls(
            tokenizer,
            language_model,
            autoencoder,
            max_length=max_length,
            backbone=stored_backbone(backbone),
            decoder=decoder,
            lora=lora,
            alignment_weight=alignment_weight,
            latent_noise_std=latent_noise_std,
            kl_weight=kl_weight,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **training) -> TextAutoencoder:
        """A new (untrained) autoencoder from nested model settings, the shape of a run config's
        ``autoencoder.model`` (`latentlm.autoencoder.model_settings`): ``backbone``, ``decoder``,
        ``lora: {r, alpha, ...}``, ``causal: {context_layers, prompt_template, memory}`` and the other
        `from_backbone` arguments by name. ``training``: ``alignment_weight``, ``latent_noise_std``,
        ``kl_weight``."""
        backbone, kwargs = backbone_arguments(config)
        return cls.from_backbone(backbone, **kwargs, **training)

    # ------------------------------------------------------------------ properties
    @property
    def causal(self) -> bool:
        """Whether the language model is decoder-only (its family's)."""
        return self.family.is_causal

    @property
    def num_latents(self) -> int:
        return self.autoencoder.config.num_latents

    @property
    def latent_dim(self) -> int:
        return self.autoencoder.config.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    # ------------------------------------------------------------------ text <-> latents
    def encode(self, texts: list[str]) -> torch.Tensor:
        """texts -> latents [B, num_latents, latent_dim]."""
        return encode_texts(self.tokenizer, self.language_model, self.autoencoder, texts, self.max_length)

    def encode_sources(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Source texts -> frozen encoder states [B, L, d_model] and mask [B, L], for a text-to-text denoiser."""
        return encode_sources(self.tokenizer, self.language_model, self.autoencoder, texts)

    def enable_context_reading(self) -> None:
        """From now on the decoder reads a text context before the latents' prompt (`LatentAutoencoder`'s
        ``read_context``, saved with it): what the decoder tuning's ``read_context`` trains."""
        if not self.causal or uses_key_value_prefix(self.autoencoder):
            raise ValueError("read_context: only a decoder-only LM reading a soft prompt reads a context.")
        self.autoencoder.register_to_config(read_context=True)

    def decode(self, latents: torch.Tensor, context_texts: list[str] | None = None, **generate_kwargs) -> list[str]:
        """latents [B, num_latents, latent_dim] -> texts (LD4LG beam search unless overridden);
        ``context_texts``: what a decoder that reads a context reads before each row's latents."""
        return decode_latents(
            self.tokenizer, self.language_model, self.autoencoder, latents, context_texts, **generate_kwargs
        )

    # ------------------------------------------------------------------ training helpers
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{input_ids, attention_mask} [B, L], truncated at max_length, on this model's device."""
        return tokenize_texts(
            self.tokenizer,
            texts,
            self.max_length,
            device=self.device,
            add_special_tokens=self.family.add_special_tokens,
        )

    def token_ids(self, texts: list[str], truncation: bool = True) -> list[list[int]]:
        """Unpadded token ids per text, as the encoder reads them (cut at max_length unless truncation=False)."""
        kwargs = dict(truncation=True, max_length=self.max_length) if truncation else {}
        return self.tokenizer(texts, add_special_tokens=self.family.add_special_tokens, **kwargs)["input_ids"]

    def encoder_modules(self) -> list[nn.Module]:
        """The frozen modules whose weights determine the encoder states (for cache keys)."""
        return self.family.encoder_modules(self.language_model, self.autoencoder.config.context_layers)

    def encoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen encoder states [B, L, d_model] (no gradient)."""
        return encoder_hidden_states(
            self.language_model, input_ids, attention_mask, self.autoencoder.config.context_layers
        )

    def make_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder targets [B, L'] from input ids: padding -> -100, as the family's decoder writes them
        (`BackboneFamily.decoder_labels`: BERT2BERT's decoder is fed its start token, not asked for it)."""
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return self.family.decoder_labels(self.language_model, labels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        reconstruction: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        alignment: bool = True,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Reconstruction loss (mean token cross-entropy) of `labels` from encoder states.

        hidden_states [B, L, d_model], attention_mask [B, L], labels [B, L'] (-100 ignored).
        ``latents`` [B, N, D], if given, are decoded instead of the compressed ``hidden_states`` (a
        decoder tuned on a denoiser's predictions of these texts' latents).
        Decoder-only backbones add ``alignment_weight`` x `losses.alignment_loss`; ``reconstruction=False``
        gives the alignment loss alone, without running the LM (a cheap warm-up of the soft prompt);
        ``alignment=False`` leaves the alignment loss out (a run that aligns only for its first steps).
        A variational autoencoder in training decodes a sample of its posterior and adds ``kl_weight``
        x `losses.gaussian_kl`. ``generator`` draws the posterior's and the latent noise
        (``latent_noise_std``), so a resumed run draws the same. ``context``: ``(ids, mask)`` [B, C]
        (`text_codec.tokenize_contexts`) a decoder reads before the latents (`enable_context_reading`).
        """
        log_variance = None
        if latents is None:
            latents, log_variance = self.autoencoder.posterior(hidden_states, attention_mask)
        loss = 0.0
        if log_variance is not None and self.training:
            if self.kl_weight:
                loss = self.kl_weight * gaussian_kl(latents, log_variance)
            latents = self.sample_posterior(latents, log_variance, generator)
        memory = self.autoencoder.reconstruct(self.perturb(latents, generator))
        aligned = alignment and bool(self.alignment_weight)
        if not (reconstruction or aligned):
            raise ValueError(
                "reconstruction=False leaves only the alignment loss, but it is off (alignment_weight is 0 "
                "or alignment=False)."
            )
        if reconstruction:
            loss = loss + self.family.reconstruction_loss(
                self.tokenizer, self.language_model, self.autoencoder, memory, labels, context
            )
        if aligned:
            loss = loss + self.alignment_weight * alignment_loss(self.tokenizer, self.language_model, memory, labels)
        return loss

    def sample_posterior(
        self, mean: torch.Tensor, log_variance: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw ``mean + exp(log_variance / 2) * ε`` of the posterior (put back on the latent sphere when
        latents are normalized), differentiable in both (the reparameterisation trick)."""
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        sample = (mean.float() + (0.5 * log_variance).exp() * noise).to(mean.dtype)
        return self.autoencoder.project(sample) if self.autoencoder.config.normalize_latents else sample

    def perturb(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """In training, ``latents + latent_noise_std * ε`` (on the latent sphere when latents are
        normalized); the latents themselves otherwise."""
        if not (self.training and self.latent_noise_std):
            return latents
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = latents + self.latent_noise_std * noise
        return self.autoencoder.project(noisy) if self.autoencoder.config.normalize_latents else noisy

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"autoencoder": [...], "language_model": [...]} (only requires_grad)."""
        return {
            "autoencoder": [p for p in self.autoencoder.parameters() if p.requires_grad],
            "language_model": [p for p in self.language_model.parameters() if p.requires_grad],
        }

    # ------------------------------------------------------------------ export
    def merged_language_model(self):
        """A plain transformers model with any LoRA adapters merged (a copy; self is unchanged)."""
        merged = merge_peft(self.language_model)
        return merged if merged is not self.language_model else copy.deepcopy(merged)

    def save_pretrained(self, save_directory: str | os.PathLike, merge_adapters: bool = False) -> Path:
        """Write the folder layout described in the module docstring (safetensors only)."""
        return save_text_autoencoder(self, save_directory, merge_adapters)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        trainable: bool = False,
        device: str | torch.device | None = None,
        latent_noise_std: float | None = None,
        alignment_weight: float | None = None,
        kl_weight: float | None = None,
    ) -> TextAutoencoder:
        """Load a folder written by `save_pretrained`.

        ``trainable=True`` restores the decoder's training mode (LoRA/new modules require grad);
        by default everything is frozen and in eval mode (inference). ``latent_noise_std``,
        ``alignment_weight`` and ``kl_weight``, if given, replace the saved training settings (to train on).
        """
        tokenizer, language_model, autoencoder, meta = load_text_autoencoder_parts(directory, trainable)
        model = cls(
            tokenizer,
            language_model,
            autoencoder,
            max_length=meta["max_length"],
            backbone=meta.get("backbone"),
            decoder=meta["decoder"],
            lora=meta.get("lora") or {},
            alignment_weight=meta.get("alignment_weight", 0.0) if alignment_weight is None else alignment_weight,
            latent_noise_std=meta.get("latent_noise_std", 0.0) if latent_noise_std is None else latent_noise_std,
            kl_weight=meta.get("kl_weight", 0.0) if kl_weight is None else kl_weight,
        )
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        if device is not None:
            model.to(device)
        return model
