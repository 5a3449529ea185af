"""The ``autoencoder.model`` section of a run config: the `TextAutoencoder` a run builds (the language
model it wraps, its LoRA adapters, how a decoder-only LM reads the latents, and the compression
network's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentlm.config.checks import one_of

__all__ = ["AutoencoderModelConfig", "CausalSettings", "LoraSettings"]


@dataclass
class LoraSettings:
    """The adapters of ``decoder: lora`` (peft's `LoraConfig`: r, lora_alpha, lora_dropout, target_modules;
    ``target_modules: null`` = the backbone family's attention projections)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class CausalSettings:
    """Decoder-only backbones: the LM's states after ``context_layers`` layers are compressed; the
    latents are read back as a soft prompt in ``prompt_template`` (one ``{memory}``; null = the
    backbone's default) or as a per-layer key/value prefix (``memory``)."""

    context_layers: int = 0
    prompt_template: str | None = None
    memory: str = "soft_prompt"  # soft_prompt | key_value_prefix


@dataclass
class AutoencoderModelConfig:
    """A `TextAutoencoder`: the language model it wraps and the compression network's shape."""

    backbone: str = "facebook/bart-base"
    max_length: int = 64
    decoder: str = "frozen"  # frozen | lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)
    causal: CausalSettings = field(default_factory=CausalSettings)
    num_latents: int = 32
    latent_dim: int = 64
    num_compression_layers: int = 3
    num_reconstruction_layers: int = 3
    # None = per backbone (LD4LG: on for BART, off for T5).
    normalize_latents: bool | None = None
    # the latents are the mean of a learned Gaussian posterior; the decoder trains on its samples (see kl_weight)
    variational: bool = False
    head_dim: int = 64
    ff_mult: int = 4
    dropout: float = 0.0
    # learned positions added to the encoder states before compression (LD4LG): 0 = none, -1 = one per token
    context_positions: int = 0
    query_init_std: float = 0.02  # initial scale of the Perceiver queries (see LatentAutoencoder)
    # memory positions per latent (soft prompt length = num_latents * memory_tokens_per_latent)
    memory_tokens_per_latent: int = 1
    # query j starts from encoder positions [j*s, (j+1)*s) (0 = plain learned queries; see LatentAutoencoder)
    tokens_per_query: int = 0
    # BERT2BERT only: initialise each new cross-attention from its layer's self-attention, or "random".
    cross_attention_init: str = "self_attention"
    plm_dropout: float | None = None  # override the language model's dropout (None = keep its config)

    def validate(self, where: str = "autoencoder.model") -> None:
        from latentlm.autoencoder.backbones import CAUSAL_MEMORY
        from latentlm.autoencoder.families import DECODER_MODES

        one_of(f"{where}.decoder", self.decoder, DECODER_MODES)
        one_of(f"{where}.causal.memory", self.causal.memory, CAUSAL_MEMORY)
        if self.context_positions < -1:
            raise ValueError(
                f"{where}.context_positions={self.context_positions}: use 0 (none), -1 (one per "
                f"token of max_length) or a positive number of positions."
            )
        if self.head_dim < 1:
            raise ValueError(f"{where}.head_dim must be a positive integer, got {self.head_dim}.")
        if self.tokens_per_query and self.num_latents * self.tokens_per_query < self.max_length:
            raise ValueError(
                f"{where}.num_latents x tokens_per_query = {self.num_latents} x {self.tokens_per_query} = "
                f"{self.num_latents * self.tokens_per_query} token positions, fewer than max_length={self.max_length}: "
                "the latents cannot hold the texts. Raise num_latents or tokens_per_query, or lower max_length."
            )
