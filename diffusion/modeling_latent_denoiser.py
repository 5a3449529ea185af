"""LatentDenoiser: the LD4LG denoising transformer over a fixed-length sequence of latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import GEGLU
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

#: Named sizes. ``tiny`` is for tests, ``small`` for CPU work, ``base`` is the LD4LG recipe.
DENOISER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, num_long_skips=1),
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, num_long_skips=3),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, num_long_skips=3),
}


def checked_class_labels(class_labels, batch: int, num_classes: int, device, message) -> torch.Tensor:
    """``class_labels`` (a tensor, a list or one id) as a long tensor ``[batch]`` on ``device``, each in
    ``[0, num_classes]`` (``num_classes``: the null class). On a CPU an id out of range raises a
    ValueError with ``message(labels)``; on an accelerator the check is asynchronous
    (`torch._assert_async`), so that validating labels never stalls the device queue."""
    class_labels = torch.as_tensor(class_labels, device=device).long()
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(batch)
    if class_labels.shape != (batch,):
        raise ValueError(f"class_labels must have shape [{batch}], got {tuple(class_labels.shape)}.")
    out_of_range = (class_labels < 0) | (class_labels > num_classes)
    if class_labels.device.type != "cpu":
        torch._assert_async(~out_of_range.any())
    elif bool(out_of_range.any()):
        raise ValueError(message(class_labels))
    return class_labels


@dataclass
class LatentDenoiserOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `[batch, num_latents, latent_dim]`):
            The model output: v, ε or ẑ0 depending on the scheduler's `prediction_type`.
    """

    sample: torch.Tensor


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B, N, H]; shift/scale [B, H]. (1 + scale) so that a zero-initialised modulation is the identity.
    return x * (1 + scale[:, None]) + shift[:, None]


class DenoiserBlock(nn.Module):
    """Pre-LN transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero).

    The conditioning vector produces shift/scale/gate for the attention and the GeGLU feed-forward.
    The modulation is zero-initialised, so every block starts as the identity (DiT's adaLN-Zero),
    which keeps a deep stack with long skips stable at the start of training.
    """

    def __init__(self, hidden_size: int, num_heads: int, ff_mult: int, dropout: float, cross_attention: bool = False):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.to_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(
            GEGLU(hidden_size, ff_mult * hidden_size),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * hidden_size, hidden_size),
        )
        self.resid_dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        # Cross-attention to the source (text-to-text models only). Its output projection starts at
        # zero, so a new block starts as the block without it.
        self.cross_attention = cross_attention
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.to_q_cross = nn.Linear(hidden_size, hidden_size)
            self.to_kv_cross = nn.Linear(hidden_size, 2 * hidden_size)
            self.to_out_cross = nn.Linear(hidden_size, hidden_size)
            nn.init.zeros_(self.to_out_cross.weight)
            nn.init.zeros_(self.to_out_cross.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H] -> [B, heads, L, H / heads]
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, N, H], cond [B, H] (already passed through SiLU), context [B, L, H] with
        context_mask [B, L] (True = attend; cross-attention blocks only) -> [B, N, H]."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(cond).chunk(6, dim=-1)
        batch, seq, width = hidden_states.shape

        h = _modulate(self.norm1(hidden_states), shift_a, scale_a)
        q, k, v = self.to_qkv(h).view(batch, seq, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(batch, seq, width)
        hidden_states = hidden_states + gate_a[:, None] * self.resid_dropout(self.to_out(attn))

        if self.cross_attention:
            q = self._heads(self.to_q_cross(self.norm_cross(hidden_states)))
            k, v = (self._heads(x) for x in self.to_kv_cross(context).chunk(2, dim=-1))
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=context_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
            )
            attn = attn.transpose(1, 2).reshape(batch, seq, width)
            hidden_states = hidden_states + self.resid_dropout(self.to_out_cross(attn))

        h = _modulate(self.norm2(hidden_states), shift_f, scale_f)
        hidden_states = hidden_states + gate_f[:, None] * self.resid_dropout(self.ff(h))
        return hidden_states


class LatentDenoiser(ModelMixin, ConfigMixin):
    """Denoising transformer over `num_latents` latent tokens of size `latent_dim` (LD4LG).

    Input per token: concat(z_t, ẑ0 from self-conditioning) projected to `hidden_size`, plus learned
    positions and the conditioning embedding. Conditioning = MLP(sinusoidal(t)) + class embedding;
    it is added to every token and drives adaLN shift/scale/gate in every block. U-ViT long skips
    connect the first `num_long_skips` blocks to their mirror blocks at the end. The output
    projection is zero-initialised, so an untrained model predicts 0.

    Class conditioning: class ids are `0 .. num_classes - 1`; the null class (classifier-free
    guidance's unconditional branch) is `num_classes`. With `num_classes=0` the model is truly
    unconditional: it has no class embedding and only accepts `class_labels=None`.

    Source conditioning (text-to-text, LD4LG): with `cross_attention_dim` set, every block
    cross-attends to the frozen encoder states of a source text `[B, L, cross_attention_dim]`
    (layer-normed, projected to `hidden_size`; padding masked). A learned null context token is
    always visible; a row whose source mask is all zero sees only it, which is the "no source"
    branch of classifier-free guidance and of source dropout in training.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_latents: int = 32,
        latent_dim: int = 64,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        ff_mult: int = 4,
        dropout: float = 0.1,
        num_long_skips: int = 3,
        self_conditioning: bool = True,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        if num_latents < 1 or latent_dim < 1:
            raise ValueError(f"num_latents ({num_latents}) and latent_dim ({latent_dim}) must be positive.")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        if not 0 <= num_long_skips <= num_layers // 2:
            raise ValueError(
                f"num_long_skips ({num_long_skips}) must be between 0 and num_layers // 2 ({num_layers // 2}): "
                "each long skip joins a block in the first half to its mirror block in the second half."
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}; "
                "give one name per class (or class_names=None)."
            )
        if class_names is not None and len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be unique, got {class_names}.")
        if cross_attention_dim is not None and cross_attention_dim < 1:
            raise ValueError(
                f"cross_attention_dim must be positive (or None for no source), got {cross_attention_dim}."
            )

        in_dim = 2 * latent_dim if self_conditioning else latent_dim
        self.input_proj = nn.Linear(in_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, num_latents, hidden_size) * 0.02)

        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_size, 4 * hidden_size, out_dim=hidden_size)
        # +1 row: the null class used for label dropout and the unconditional branch of CFG.
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        self.cond_to_tokens = nn.Linear(hidden_size, hidden_size)

        has_source = cross_attention_dim is not None
        if has_source:
            self.context_norm = nn.LayerNorm(cross_attention_dim, eps=1e-6)
            self.context_proj = nn.Linear(cross_attention_dim, hidden_size)
            self.null_context = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)

        self.blocks = nn.ModuleList(
            DenoiserBlock(hidden_size, num_heads, ff_mult, dropout, cross_attention=has_source)
            for _ in range(num_layers)
        )
        # skip_projs[i] merges the output of block i into the input of block (num_layers - 1 - i).
        self.skip_projs = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_long_skips))

        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        nn.init.zeros_(self.out_modulation.weight)
        nn.init.zeros_(self.out_modulation.bias)
        self.output_proj = nn.Linear(hidden_size, latent_dim)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    @classmethod
    def from_size(cls, size: str, **overrides) -> LatentDenoiser:
        """Build a denoiser of a named size (`tiny`, `small`, `base`); keyword arguments override it."""
        if size not in DENOISER_SIZES:
            raise ValueError(f"Unknown denoiser size {size!r}; choose one of {sorted(DENOISER_SIZES)}.")
        return cls(**{**DENOISER_SIZES[size], **overrides})

    @property
    def null_class_id(self) -> int:
        """Class id of the null class (= `num_classes`): label dropout target and CFG's unconditional branch."""
        return self.config.num_classes

    def _class_embedding(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        num_classes = self.config.num_classes
        if num_classes == 0:
            if class_labels is not None and bool((torch.as_tensor(class_labels) != 0).any()):
                raise ValueError(
                    "This denoiser is unconditional (num_classes=0) but got class labels other than the null "
                    "class 0; pass class_labels=None or train a class-conditional model."
                )
            return None
        if class_labels is None:
            class_labels = torch.full((batch,), num_classes, dtype=torch.long, device=device)
        class_labels = checked_class_labels(
            class_labels,
            batch,
            num_classes,
            device,
            lambda labels: (
                f"class_labels must lie in [0, {num_classes}] ({num_classes} = null class), "
                f"got values {sorted(set(labels.tolist()))}."
            ),
        )
        return self.class_embedding(class_labels)

    def _context(
        self, encoder_hidden_states: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None, batch: int, dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The source as cross-attention context: (null token + projected states [B, 1 + L, H], mask [B, 1 + L])."""
        dim = self.config.cross_attention_dim
        if dim is None:
            if encoder_hidden_states is not None:
                raise ValueError(
                    "This denoiser was trained without a source (cross_attention_dim=None) but got "
                    "encoder_hidden_states; sample it without a source, or train a text-to-text model "
                    "(data.source_column)."
                )
            return None, None
        null = self.null_context.to(dtype).expand(batch, -1, -1)
        visible = torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        if encoder_hidden_states is None:
            return null, visible
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch
            or encoder_hidden_states.shape[2] != dim
        ):
            raise ValueError(
                f"encoder_hidden_states must have shape [{batch}, source_length, {dim}] (cross_attention_dim), "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=null.device)
        if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(
                f"encoder_attention_mask must have shape {tuple(encoder_hidden_states.shape[:2])}, "
                f"got {tuple(encoder_attention_mask.shape)}."
            )
        states = self.context_proj(self.context_norm(encoder_hidden_states.to(dtype)))
        mask = torch.cat([visible, encoder_attention_mask.to(device=null.device).bool()], dim=1)
        return torch.cat([null, states], dim=1), mask

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        self_cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> LatentDenoiserOutput | tuple[torch.Tensor]:
        """
        Args:
            sample: noisy latents z_t `[batch, num_latents, latent_dim]`.
            timestep: `[batch]` or a scalar (same for the whole batch), in scheduler train-step units.
            self_cond: ẑ0 from a previous prediction `[batch, num_latents, latent_dim]`; None = zeros.
            class_labels: `[batch]` long in `[0, num_classes]`; None = the null class.
            encoder_hidden_states: the source's frozen encoder states `[batch, source_length,
                cross_attention_dim]` (text-to-text models only); None = no source for any row.
            encoder_attention_mask: `[batch, source_length]`, 1 for source tokens, 0 for padding; an
                all-zero row means "no source" for that row.
        Returns:
            `LatentDenoiserOutput(sample=[batch, num_latents, latent_dim])` (or a 1-tuple).
        """
        cfg = self.config
        if sample.ndim != 3 or sample.shape[1:] != (cfg.num_latents, cfg.latent_dim):
            raise ValueError(
                f"sample must have shape [batch, {cfg.num_latents}, {cfg.latent_dim}] "
                f"(num_latents, latent_dim of this denoiser), got {tuple(sample.shape)}."
            )
        batch = sample.shape[0]
        device = sample.device

        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape [{batch}], got {tuple(timestep.shape)}.")

        if cfg.self_conditioning:
            if self_cond is None:
                self_cond = torch.zeros_like(sample)
            elif self_cond.shape != sample.shape:
                raise ValueError(
                    f"self_cond must match sample's shape {tuple(sample.shape)}, got {tuple(self_cond.shape)}."
                )
            x = torch.cat([sample, self_cond.to(sample.dtype)], dim=-1)
        else:
            if self_cond is not None:
                raise ValueError("This denoiser was built with self_conditioning=False; pass self_cond=None.")
            x = sample

        dtype = self.input_proj.weight.dtype
        # The sinusoidal features are computed in float32 (large arguments), then cast to the weights' dtype.
        emb = self.time_embedding(self.time_proj(timestep.float()).to(dtype))
        class_emb = self._class_embedding(class_labels, batch, device)
        if class_emb is not None:
            emb = emb + class_emb.to(emb.dtype)

        hidden = self.input_proj(x.to(dtype)) + self.pos_embed.to(dtype) + self.cond_to_tokens(emb)[:, None]
        cond = F.silu(emb)
        context, context_mask = self._context(encoder_hidden_states, encoder_attention_mask, batch, dtype)

        num_layers, num_skips = cfg.num_layers, cfg.num_long_skips
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            j = num_layers - 1 - i  # mirror index: block i's skip partner
            if j < num_skips:
                hidden = self.skip_projs[j](torch.cat([hidden, skips[j]], dim=-1))
            hidden = block(hidden, cond, context, context_mask)
            if i < num_skips:
                skips.append(hidden)

        shift, scale = self.out_modulation(cond).chunk(2, dim=-1)
        out = self.output_proj(_modulate(self.norm_out(hidden), shift, scale))
        if not return_dict:
            return (out,)
        return LatentDenoiserOutput(sample=out)


__all__ = ["DENOISER_SIZES", "LatentDenoiser", "LatentDenoiserOutput", "DenoiserBlock"]
