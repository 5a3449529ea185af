"""TextAutoencoder: tokenizer + pretrained LM (seq2seq or decoder-only, + PEFT) + LatentAutoencoder.

Folder layout written by `save_pretrained`::

    text_autoencoder.json   backbone, decoder mode, max_length, LoRA settings
    tokenizer/              tokenizer.save_pretrained
    autoencoder/            LatentAutoencoder (config.json + safetensors)
    language_model/         decoder "lora": a PEFT adapter (load with peft.PeftModel.from_pretrained)
                            otherwise (or merge_adapters=True): the full transformers model
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from latentlm.autoencoder import LatentAutoencoder
from latentlm.autoencoder.adapters import configure_trainable
from latentlm.autoencoder.backbones import (
    CAUSAL_MEMORY,
    attention_shape,
    backbone_family,
    decoder_layers,
    encoder_hidden_size,
    load_backbone,
    load_language_model,
    prompt_template_for,
)
from latentlm.autoencoder.losses import alignment_loss, causal_reconstruction_loss, seq2seq_reconstruction_loss
from latentlm.autoencoder.text_codec import (
    decode_latents,
    encode_sources,
    encode_texts,
    encoder_hidden_states,
    is_causal_lm,
    merge_peft,
    tokenize_texts,
    unwrap_peft,
    uses_key_value_prefix,
)
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from latentlm.files import read_json, refuse_pickled_weights

__all__ = ["TextAutoencoder"]

CONFIG_NAME = "text_autoencoder.json"


def _start_soft_prompt_at_embedding_scale(autoencoder: LatentAutoencoder, language_model) -> None:
    """The soft prompt stands in for input embeddings: start its norm at theirs."""
    embeddings = language_model.get_input_embeddings().weight
    with torch.no_grad():
        autoencoder.reconstruction_norm.weight.fill_(
            float(embeddings.norm(dim=-1).mean()) / autoencoder.memory_dim**0.5
        )


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
        self.causal = is_causal_lm(language_model)
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
        if alignment_weight and uses_key_value_prefix(autoencoder):
            raise ValueError(
                "alignment_weight pulls soft-prompt slots towards token embeddings, but this autoencoder writes a "
                "key/value prefix (causal_memory='key_value_prefix'): set alignment_weight to 0."
            )
        if latent_noise_std < 0:
            raise ValueError(f"latent_noise_std must be >= 0, got {latent_noise_std}.")
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.autoencoder = autoencoder
        self.max_length = int(max_length)
        self.alignment_weight = float(alignment_weight)
        self.latent_noise_std = float(latent_noise_std)
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
    ) -> TextAutoencoder:
        """A new (untrained) autoencoder over a backbone (see `latentlm.autoencoder.backbones.load_backbone`).

        ``normalize_latents=None``: off for T5, on otherwise (LD4LG). ``context_positions=-1``: one
        learned position embedding per token of ``max_length`` (see `LatentAutoencoder`).

        Decoder-only backbones (``"smollm2"``, ``"gpt2"``, any causal LM folder): the LM's states after
        ``context_layers`` layers are compressed; the latents come back as a soft prompt of
        ``num_latents * memory_tokens_per_latent`` input embeddings in ``prompt_template`` (default: the
        backbone's, else its chat template asking to repeat the text), or with
        ``causal_memory="key_value_prefix"`` as keys and values in every layer. ``alignment_weight`` > 0
        pulls soft-prompt slot j towards the embedding of the text's token j: the prompt then reads
        like the text itself, which the LM already knows how to repeat.

        ``latent_noise_std`` > 0: in training the decoder reads ``latents + latent_noise_std * ε``
        (projected back onto the latent sphere when latents are normalized), so it learns to write
        fluent text from the imperfect latents a denoiser samples, not only from exact encodings.
        """
        if causal_memory not in CAUSAL_MEMORY:
            raise ValueError(f"causal_memory={causal_memory!r}: use one of {list(CAUSAL_MEMORY)}.")
        lora = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
        tokenizer, language_model = load_backbone(
            backbone,
            decoder=decoder,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules,
            cross_attention_init=cross_attention_init,
            plm_dropout=plm_dropout,
            context_layers=context_layers,
        )
        family = backbone_family(language_model)
        if family == "causal":
            prompt_template = prompt_template_for(backbone, tokenizer) if prompt_template is None else prompt_template
        elif prompt_template is not None or context_layers or tokens_per_query or causal_memory != "soft_prompt":
            raise ValueError(
                "prompt_template, context_layers, tokens_per_query and causal_memory are for decoder-only "
                f"backbones; {backbone!r} is a {family} encoder-decoder."
            )
        key_value_shape = attention_shape(language_model) if causal_memory == "key_value_prefix" else {}
        autoencoder = LatentAutoencoder(
            d_model=encoder_hidden_size(language_model),
            num_latents=num_latents,
            latent_dim=latent_dim,
            num_compression_layers=num_compression_layers,
            num_reconstruction_layers=num_reconstruction_layers,
            head_dim=head_dim,
            ff_mult=ff_mult,
            normalize_latents=family != "t5" if normalize_latents is None else normalize_latents,
            dropout=dropout,
            context_positions=max_length if context_positions == -1 else context_positions,
            query_init_std=query_init_std,
            memory_tokens_per_latent=memory_tokens_per_latent,
            tokens_per_query=tokens_per_query,
            context_layers=context_layers,
            prompt_template=prompt_template,
            **key_value_shape,
        )
        if family == "causal" and not key_value_shape:
            _start_soft_prompt_at_embedding_scale(autoencoder, language_model)
        return cls(
            tokenizer,
            language_model,
            autoencoder,
            max_length=max_length,
            backbone=cls.stored_backbone(backbone),
            decoder=decoder,
            lora=lora,
            alignment_weight=alignment_weight,
            latent_noise_std=latent_noise_std,
        )

    @staticmethod
    def stored_backbone(backbone: str) -> str:
        """How a backbone is recorded with the model: a local folder as an absolute path (the saved
        model then loads from any directory), a name or hub id as given."""
        return os.path.abspath(backbone) if os.path.isdir(str(backbone)) else str(backbone)

    # ------------------------------------------------------------------ properties
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

    def decode(self, latents: torch.Tensor, **generate_kwargs) -> list[str]:
        """latents [B, num_latents, latent_dim] -> texts (LD4LG beam search unless overridden)."""
        return decode_latents(self.tokenizer, self.language_model, self.autoencoder, latents, **generate_kwargs)

    # ------------------------------------------------------------------ training helpers
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{input_ids, attention_mask} [B, L], truncated at max_length, on this model's device."""
        return tokenize_texts(
            self.tokenizer, texts, self.max_length, device=self.device, add_special_tokens=not self.causal
        )

    def token_ids(self, texts: list[str], truncation: bool = True) -> list[list[int]]:
        """Unpadded token ids per text, as the encoder reads them (cut at max_length unless truncation=False)."""
        kwargs = dict(truncation=True, max_length=self.max_length) if truncation else {}
        return self.tokenizer(texts, add_special_tokens=not self.causal, **kwargs)["input_ids"]

    def encoder_modules(self) -> list[nn.Module]:
        """The frozen modules whose weights determine the encoder states (for cache keys)."""
        if not self.causal:
            return [self.language_model.get_encoder()]
        layers = decoder_layers(self.language_model)[: self.autoencoder.config.context_layers]
        return [self.language_model.get_input_embeddings(), *layers]

    def encoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen encoder states [B, L, d_model] (no gradient)."""
        return encoder_hidden_states(
            self.language_model, input_ids, attention_mask, self.autoencoder.config.context_layers
        )

    def make_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder targets [B, L'] from input ids: padding -> -100.

        When every sequence starts with the decoder start token (BERT2BERT: [CLS]), that token is
        dropped: the decoder is fed it as its first input and need not predict it.
        """
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if self.causal:
            return labels
        start = unwrap_peft(self.language_model).generation_config.decoder_start_token_id
        if start is not None and labels.shape[1] > 1 and bool((labels[:, 0] == start).all()):
            labels = labels[:, 1:].contiguous()
        return labels

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        reconstruction: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ):
        """Reconstruction loss (mean token cross-entropy) of `labels` from encoder states.

        hidden_states [B, L, d_model], attention_mask [B, L], labels [B, L'] (-100 ignored).
        ``latents`` [B, N, D], if given, are decoded instead of the compressed ``hidden_states`` (a
        decoder tuned on a denoiser's predictions of these texts' latents).
        Decoder-only backbones add ``alignment_weight`` x `losses.alignment_loss`; ``reconstruction=False``
        gives the alignment loss alone, without running the LM (a cheap warm-up of the soft prompt).
        ``generator`` draws the latent noise (``latent_noise_std``), so a resumed run draws the same.
        """
        if latents is None:
            latents = self.autoencoder.compress(hidden_states, attention_mask)
        memory = self.autoencoder.reconstruct(self.perturb(latents, generator))
        if not self.causal:
            return seq2seq_reconstruction_loss(self.tokenizer, self.language_model, memory, labels)
        input_ids = labels.masked_fill(labels == -100, self.tokenizer.pad_token_id)
        text_mask = (labels != -100).long()
        if not reconstruction and not self.alignment_weight:
            raise ValueError("reconstruction=False leaves only the alignment loss, but alignment_weight is 0.")
        loss = 0.0
        if reconstruction:
            loss = causal_reconstruction_loss(
                self.tokenizer, self.language_model, self.autoencoder, memory, input_ids, text_mask
            )
        if self.alignment_weight:
            alignment = alignment_loss(self.tokenizer, self.language_model, memory, input_ids, text_mask)
            loss = loss + self.alignment_weight * alignment
        return loss

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
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.autoencoder.save_pretrained(out / "autoencoder", safe_serialization=True)
        is_adapter = isinstance(self.language_model, PeftModel) and not merge_adapters
        if is_adapter:
            self.language_model.save_pretrained(out / "language_model", safe_serialization=True)
        elif isinstance(self.language_model, PeftModel):
            self.merged_language_model().save_pretrained(out / "language_model", safe_serialization=True)
        else:
            self.language_model.save_pretrained(out / "language_model", safe_serialization=True)
        meta = {
            "backbone": self.backbone,
            "decoder": self.decoder_mode,
            "language_model_format": "peft_adapter" if is_adapter else "transformers",
            "max_length": self.max_length,
            "lora": self.lora,
            "alignment_weight": self.alignment_weight,
            "latent_noise_std": self.latent_noise_std,
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        trainable: bool = False,
        device: str | torch.device | None = None,
        latent_noise_std: float | None = None,
        alignment_weight: float | None = None,
    ) -> TextAutoencoder:
        """Load a folder written by `save_pretrained`.

        ``trainable=True`` restores the decoder's training mode (LoRA/new modules require grad);
        by default everything is frozen and in eval mode (inference). ``latent_noise_std`` and
        ``alignment_weight``, if given, replace the saved training settings (to train on).
        """
        root = Path(directory)
        meta_path = root / CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{root} is not a TextAutoencoder folder: {CONFIG_NAME} is missing (expected the output of "
                f"TextAutoencoder.save_pretrained or of train-autoencoder)."
            )
        refuse_pickled_weights(root)
        meta = read_json(meta_path)
        for path in sorted(root.glob("*/*.json")):
            read_json(path)  # a damaged tokenizer.json or config.json is named here, not deep in a loader
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        autoencoder = LatentAutoencoder.from_pretrained(root / "autoencoder")
        lora = meta.get("lora") or {}
        if meta["language_model_format"] == "peft_adapter":
            backbone = meta.get("backbone")
            if not backbone:
                raise ValueError(f"{meta_path} has no 'backbone' to load the LoRA adapter's base model from.")
            if not os.path.isdir(backbone) and os.path.isdir(root / backbone):
                backbone = str(root / backbone)  # a folder given relative to the model folder
            if backbone.startswith((".", "/")) and not os.path.isdir(backbone):
                raise FileNotFoundError(
                    f"The LoRA adapters in {root / 'language_model'} were trained on the backbone folder {backbone!r}, "
                    f"which does not exist (from {os.getcwd()!r}). Restore that folder, or edit 'backbone' in "
                    f"{meta_path} to where it is now."
                )
            _, base = load_backbone(backbone, decoder="frozen")
            language_model = PeftModel.from_pretrained(base, root / "language_model", is_trainable=trainable)
        else:
            language_model = load_language_model(str(root / "language_model"))
            mode = meta["decoder"] if trainable and meta["decoder"] != "lora" else "frozen"
            language_model = configure_trainable(language_model, mode, context_layers=autoencoder.config.context_layers)
        model = cls(
            tokenizer,
            language_model,
            autoencoder,
            max_length=meta["max_length"],
            backbone=meta.get("backbone"),
            decoder=meta["decoder"],
            lora=lora,
            alignment_weight=meta.get("alignment_weight", 0.0) if alignment_weight is None else alignment_weight,
            latent_noise_std=meta.get("latent_noise_std", 0.0) if latent_noise_std is None else latent_noise_std,
        )
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        if device is not None:
            model.to(device)
        return model
