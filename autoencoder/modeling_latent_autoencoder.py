"""LatentAutoencoder: compresses PLM encoder states to a fixed number of continuous latents.

compression:    H [B, L, d_model] (+ mask [B, L]) --Perceiver resampler--> z [B, N, D]
reconstruction: z [B, N, D] --proj, learned positions, transformer--> M [B, N * k, memory_dim]

M is what the language model reads: the memory (``encoder_outputs``) a seq2seq decoder
cross-attends to, or the soft prompt (input embeddings) a decoder-only LM continues from.
``memory_dim`` defaults to ``d_model``; ``k = memory_tokens_per_latent`` defaults to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["LatentAutoencoder"]


class Attention(nn.Module):
    """Multi-head attention with QK RMS-norm (stabilises the logits of a randomly initialised
    resampler reading the large-norm states of a pretrained encoder)."""

    def __init__(self, dim: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(
                f"The model width {dim} is not divisible by head_dim={head_dim}; choose a head_dim that "
                f"divides d_model (e.g. 64 for 384/768/1024, 16 or 32 for tiny test models)."
            )
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, W] queries, context [B, S, W] keys/values, mask [B, S] bool (True = attend)."""
        # QK RMS-norm in fp32 (under bf16 autocast the projections are bf16 and the norm weights
        # fp32, which would miss the fused kernel), then back to v's dtype for attention.
        v = self._heads(self.to_v(context))
        q = self.q_norm(self._heads(self.to_q(x)).float()).to(v.dtype)
        k = self.k_norm(self._heads(self.to_k(context)).float()).to(v.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )


class PerceiverLayer(nn.Module):
    """Pre-LN layer: latents attend to [context; latents], then a GELU feed-forward."""

    def __init__(self, dim: int, head_dim: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_context = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, head_dim, dropout)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        kv = torch.cat([self.norm_context(context), normed], dim=1)
        latent_mask = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)
        mask = torch.cat([context_mask, latent_mask], dim=1)
        latents = latents + self.attn(normed, kv, mask)
        return latents + self.ff(latents)


class TransformerLayer(nn.Module):
    """Pre-LN self-attention layer (no mask: all N latents are always present)."""

    def __init__(self, dim: int, head_dim: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, head_dim, dropout)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        x = x + self.attn(normed, normed)
        return x + self.ff(x)


def log_variance_head(d_model: int, latent_dim: int) -> nn.Linear:
    """A variational posterior's log-variance from the compressed states: every text starts with std
    0.5 (log variance log 0.25) in every dimension, the noise the decoder of a plain autoencoder is
    commonly trained with (``latent_noise_std``)."""
    head = nn.Linear(d_model, latent_dim)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, math.log(0.25))
    return head


def check_causal_memory(prompt_template: str | None, key_value_shape: tuple[int, int, int], read_context: bool):
    """How a decoder-only LM reads the memory: a prompt template with one ``{memory}``, a key/value
    prefix all of whose sizes are set (or none), and a context only before a soft prompt."""
    if prompt_template is not None and prompt_template.count("{memory}") != 1:
        raise ValueError(f"prompt_template must contain '{{memory}}' exactly once, got {prompt_template!r}.")
    if any(v < 0 for v in key_value_shape) or (any(key_value_shape) and not all(key_value_shape)):
        raise ValueError(
            "key_value_layers, key_value_heads and key_value_head_dim must all be positive (a key/value "
            f"prefix) or all 0 (a soft prompt), got {key_value_shape}."
        )
    if read_context and (prompt_template is None or any(key_value_shape)):
        raise ValueError(
            "read_context: a decoder-only LM reads the context before its soft prompt, so it needs a "
            "prompt_template and no key/value prefix (key_value_layers=0)."
        )


class LatentAutoencoder(ModelMixin, ConfigMixin):
    """Perceiver-resampler compression and transformer reconstruction (LD4LG).

    Args:
        d_model: hidden size of the PLM encoder states (and of the memory the decoder reads).
        num_latents: N, number of latent vectors.
        latent_dim: D, size of each latent vector.
        num_compression_layers / num_reconstruction_layers: depth of each network.
        head_dim: attention head size (d_model must be divisible by it).
        ff_mult: feed-forward expansion.
        normalize_latents: if True, latents are ``normalize(z, dim=-1) * sqrt(D)``.
        dropout: attention and feed-forward dropout.
        memory_dim: width of the reconstruction network and of its output (default ``d_model``):
            the hidden size of the model that reads the memory, when that differs from the
            encoder's (a MiniLM encoder feeding a SmolLM2 decoder).
        memory_tokens_per_latent: memory positions written per latent (k). With k > 1 each latent
            is projected to k positions, so N latents give a soft prompt of N * k vectors: long
            enough to hold one vector per token of the text while the latents stay N x D.
        tokens_per_query: if > 0, query j starts from a projection of encoder positions
            ``[j * s, (j + 1) * s)`` (s = tokens_per_query) added to its learned vector, so every
            latent holds its own stretch of the text from the first step, in order; the Perceiver
            layers then add context. Texts must fit in ``num_latents * s`` tokens. 0 = plain
            learned queries (LD4LG). With it, slot-aligned memory (k = s) reads like the text's own
            token sequence, which a decoder-only LM can copy.
        context_layers: decoder-only LMs: the compressed states are the LM's own after this many
            of its layers (0 = its input embeddings). Unused for seq2seq backbones.
        key_value_layers, key_value_heads, key_value_head_dim: decoder-only LMs read the memory as a
            per-layer key/value prefix (prefix tuning; PLANNER, 500xCompressor) instead of a soft
            prompt of input embeddings: a linear map writes, for each memory position, the keys and
            values of every one of the LM's ``key_value_layers`` attention layers
            (``key_value_heads`` x ``key_value_head_dim`` each; see `key_values`). 0 = soft prompt.
        prompt_template: decoder-only LMs: the text around the soft prompt, with one
            ``{memory}`` where the memory goes (see `text_codec`). None for seq2seq backbones,
            whose decoder cross-attends to the memory.
        context_positions: if > 0, learned absolute position embeddings for that many encoder
            positions are added to the encoder states before compression (LD4LG's Perceiver does
            this); it helps where the encoder's last states carry little word-order information,
            as in sentence-embedding models such as all-MiniLM. 0 = none.
        query_init_std: initial scale of the learned queries. With a small one (0.02) the
            attended context swamps the queries in the residual stream and the latents of a text
            start as nearly the same vector; a backbone whose states make reconstruction hard can
            stay there (a bag of words), so such backbones want unit scale, the Perceiver
            resampler's own (Flamingo, LD4LG). The small scale is the default because it samples
            better on the quickstart corpus (figures in the repository's ``benchmarks/README.md``).
        variational: if True, compression also writes a log-variance per latent dimension: the
            latents (`compress`) are the mean of a diagonal Gaussian posterior (`posterior`), and in
            training the decoder reads a sample of it, its spread learned against a KL penalty
            (`TextAutoencoder`'s ``kl_weight``; Optimus, PLANNER) instead of a fixed noise std.
        read_context: decoder-only LMs: the decoder also reads a text context before the soft prompt
            (a segment's context: the story so far, as PLANNER's decoder reads it), so it writes the
            text in that context. Set by the decoder tuning's ``read_context``.
    """

    @register_to_config
    def __init__(
        self,
        d_model: int,
        num_latents: int = 32,
        latent_dim: int = 64,
        num_compression_layers: int = 3,
        num_reconstruction_layers: int = 3,
        head_dim: int = 64,
        ff_mult: int = 4,
        normalize_latents: bool = True,
        dropout: float = 0.0,
        context_positions: int = 0,
        query_init_std: float = 0.02,
        memory_dim: int | None = None,
        memory_tokens_per_latent: int = 1,
        tokens_per_query: int = 0,
        context_layers: int = 0,
        prompt_template: str | None = None,
        key_value_layers: int = 0,
        key_value_heads: int = 0,
        key_value_head_dim: int = 0,
        variational: bool = False,
        read_context: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_latents", num_latents),
            ("latent_dim", latent_dim),
            ("num_compression_layers", num_compression_layers),
            ("num_reconstruction_layers", num_reconstruction_layers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if memory_tokens_per_latent < 1:
            raise ValueError(f"memory_tokens_per_latent must be >= 1, got {memory_tokens_per_latent}.")
        if memory_dim is not None and memory_dim < 1:
            raise ValueError(f"memory_dim must be a positive integer or None (= d_model), got {memory_dim}.")
        width = d_model if memory_dim is None else memory_dim
        if not query_init_std > 0:
            raise ValueError(f"query_init_std must be positive, got {query_init_std}.")
        if context_layers < 0:
            raise ValueError(f"context_layers must be >= 0, got {context_layers}.")
        check_causal_memory(prompt_template, (key_value_layers, key_value_heads, key_value_head_dim), read_context)
        if context_positions < 0:
            raise ValueError(f"context_positions must be >= 0 (0 = no position embeddings), got {context_positions}.")
        # Compression.
        self.context_position_embeddings = (
            nn.Parameter(torch.randn(context_positions, d_model) * d_model**-0.5) if context_positions else None
        )
        self.latent_queries = nn.Parameter(torch.randn(num_latents, d_model) * query_init_std)
        if tokens_per_query < 0:
            raise ValueError(f"tokens_per_query must be >= 0 (0 = plain learned queries), got {tokens_per_query}.")
        self.query_from_context = nn.Linear(tokens_per_query * d_model, d_model) if tokens_per_query else None
        self.compression_layers = nn.ModuleList(
            PerceiverLayer(d_model, head_dim, ff_mult, dropout) for _ in range(num_compression_layers)
        )
        self.compression_norm = nn.LayerNorm(d_model)
        self.to_latent = nn.Linear(d_model, latent_dim)
        self.to_log_variance = log_variance_head(d_model, latent_dim) if variational else None
        # Reconstruction.
        self.from_latent = nn.Linear(latent_dim, width * memory_tokens_per_latent)
        self.reconstruction_positions = nn.Parameter(torch.randn(num_latents * memory_tokens_per_latent, width) * 0.02)
        self.reconstruction_layers = nn.ModuleList(
            TransformerLayer(width, head_dim, ff_mult, dropout) for _ in range(num_reconstruction_layers)
        )
        # PLM encoders end in a (RMS/Layer)Norm, so the decoder expects memory of that scale.
        self.reconstruction_norm = nn.LayerNorm(width)
        self.to_key_values = None
        if key_value_layers:
            # Zero keys and values at first: the LM starts unchanged, attending to an empty prefix.
            self.to_key_values = nn.Linear(width, key_value_layers * 2 * key_value_heads * key_value_head_dim)
            nn.init.zeros_(self.to_key_values.weight)
            nn.init.zeros_(self.to_key_values.bias)

    def compress(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, L, d_model], attention_mask [B, L] (1 = token, 0 = padding) -> [B, N, D]
        (a variational autoencoder's posterior mean)."""
        return self.posterior(hidden_states, attention_mask)[0]

    def posterior(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(latents, log_variance)``, both [B, N, D]: the latents as `compress` returns them and, for a
        ``variational`` autoencoder, the log-variance of the Gaussian posterior around them (else None)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.d_model:
            raise ValueError(
                f"hidden_states must have shape [batch, length, {self.config.d_model}], got "
                f"{tuple(hidden_states.shape)}; is this autoencoder built for this backbone's d_model?"
            )
        b, length, _ = hidden_states.shape
        if attention_mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=hidden_states.device)
        else:
            if attention_mask.shape != (b, length):
                raise ValueError(f"attention_mask must have shape {(b, length)}, got {tuple(attention_mask.shape)}.")
            mask = attention_mask.to(device=hidden_states.device, dtype=torch.bool)
        # Zero padded positions so that non-finite garbage there cannot leak through 0 * inf.
        # Cached states may be stored in bf16; compute in the module's dtype (autocast lowers it).
        context = hidden_states.to(self.latent_queries.dtype)
        if self.context_position_embeddings is not None:
            if length > self.config.context_positions:
                raise ValueError(
                    f"The encoder states hold {length} positions but this autoencoder has position embeddings "
                    f"for {self.config.context_positions} (context_positions); truncate the texts to that "
                    f"many tokens or build the autoencoder with a larger context_positions."
                )
            context = context + self.context_position_embeddings[:length]
        context = context.masked_fill(~mask[..., None], 0.0)
        latents = self.latent_queries[None].expand(b, -1, -1)
        if self.query_from_context is not None:
            latents = latents + self.query_from_context(self._strided_context(context))
        for layer in self.compression_layers:
            latents = layer(latents, context, mask)
        states = self.compression_norm(latents)
        z = self.to_latent(states)
        log_variance = None
        if self.to_log_variance is not None:
            # clamped as diffusers' DiagonalGaussianDistribution does: a diverging head cannot make exp() infinite
            log_variance = self.to_log_variance(states).float().clamp(-30.0, 20.0)
        return (self.project(z) if self.config.normalize_latents else z), log_variance

    def compression_parameters(self) -> list[nn.Parameter]:
        """The parameters `posterior` reads (the latents and a variational posterior's spread): with them
        frozen, every text keeps the latents it has, so denoisers and latent caches built on them stay
        valid while the reconstruction side trains."""
        modules = [self.compression_layers, self.compression_norm, self.to_latent]
        modules += [m for m in (self.query_from_context, self.to_log_variance) if m is not None]
        params = [self.latent_queries, *(p for module in modules for p in module.parameters())]
        if self.context_position_embeddings is not None:
            params.append(self.context_position_embeddings)
        return params

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """Each latent vector scaled to norm ``sqrt(latent_dim)``: the sphere `compress` writes to when
        ``normalize_latents`` is set."""
        return F.normalize(latents.float(), dim=-1).to(latents.dtype) * math.sqrt(self.config.latent_dim)

    def _strided_context(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L, d] (zero at padding) -> [B, N, s * d]: positions j*s .. j*s+s-1 side by side for query j."""
        b, length, d = context.shape
        n, s = self.config.num_latents, self.config.tokens_per_query
        if length > n * s:
            raise ValueError(
                f"The text holds {length} positions but this autoencoder's queries read at most "
                f"{n * s} (num_latents={n} x tokens_per_query={s}); truncate the texts to that many tokens."
            )
        context = F.pad(context, (0, 0, 0, n * s - length))
        return context.reshape(b, n, s * d)

    @property
    def memory_dim(self) -> int:
        return self.config.memory_dim or self.config.d_model

    @property
    def memory_length(self) -> int:
        return self.config.num_latents * self.config.memory_tokens_per_latent

    def reconstruct(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, N, D] -> memory [B, N * k, memory_dim]."""
        n, d = self.config.num_latents, self.config.latent_dim
        if latents.dim() != 3 or latents.shape[1:] != (n, d):
            raise ValueError(f"latents must have shape [batch, {n}, {d}], got {tuple(latents.shape)}.")
        x = self.from_latent(latents.to(self.from_latent.weight.dtype))
        x = x.reshape(x.shape[0], self.memory_length, self.memory_dim) + self.reconstruction_positions
        for layer in self.reconstruction_layers:
            x = layer(x)
        return self.reconstruction_norm(x)

    def key_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """memory [B, P, memory_dim] -> for each LM layer, (keys, values) ``[B, key_value_heads, P,
        key_value_head_dim]``: the prefix a decoder-only LM attends to before its prompt and text."""
        if self.to_key_values is None:
            raise ValueError("This autoencoder writes a soft prompt, not a key/value prefix (key_value_layers=0).")
        c = self.config
        b, p = memory.shape[:2]
        kv = self.to_key_values(memory).view(b, p, c.key_value_layers, 2, c.key_value_heads, c.key_value_head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [layers, 2, B, heads, P, head_dim]
        return [(kv[layer, 0], kv[layer, 1]) for layer in range(c.key_value_layers)]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """compress then reconstruct: [B, L, d_model] -> [B, N * k, memory_dim]."""
        return self.reconstruct(self.compress(hidden_states, attention_mask))
