"""Text <-> latents on a pipeline's components: what `LatentTextDiffusionPipeline` offers besides sampling."""

from __future__ import annotations

import torch
from latentlm.autoencoder.text_codec import decode_latents, encode_sources, encode_texts
from latentlm.pipelines.interpolation import interpolation_path

__all__ = ["TextLatentsMixin"]


class TextLatentsMixin:
    """``encode`` / ``decode`` / ``encode_sources`` / ``interpolate`` through the pipeline's ``tokenizer``,
    ``language_model`` and ``autoencoder`` (latent shapes from its ``denoiser``)."""

    @torch.no_grad()
    def encode(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Texts -> clean latents ``[B, num_latents, latent_dim]`` (float32)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode() needs at least one text.")
        latents = encode_texts(
            self.tokenizer, self.language_model, self.autoencoder, texts, max_length or self.config.max_length
        )
        return latents.float()

    @torch.no_grad()
    def encode_sources(self, source_texts: list[str], repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Source texts -> their encoder states ``[B * repeats, L, d_model]`` (in the denoiser's dtype) and
        mask ``[B * repeats, L]``, each source repeated ``repeats`` times in a row."""
        states, mask = encode_sources(self.tokenizer, self.language_model, self.autoencoder, list(source_texts))
        device = self._execution_device
        states = states.to(device=device, dtype=self.denoiser.dtype).repeat_interleave(repeats, dim=0)
        return states, mask.to(device).repeat_interleave(repeats, dim=0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, **generate_kwargs) -> list[str]:
        """Latents ``[B, num_latents, latent_dim]`` -> texts.

        ``generate_kwargs`` override the pipeline's ``config.decode_kwargs``, which override
        `text_codec.DEFAULT_GENERATE_KWARGS` (LD4LG's beam search).
        """
        generate_kwargs = {**(self.config.get("decode_kwargs") or {}), **generate_kwargs}
        expected = (self.denoiser.config.num_latents, self.denoiser.config.latent_dim)
        if not torch.is_tensor(latents):
            raise TypeError(
                f"decode() takes a latent tensor [batch, {expected[0]}, {expected[1]}], got "
                f"{type(latents).__name__}; use encode(texts) or the pipeline's output .latents."
            )
        if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected [batch, {expected[0]}, {expected[1]}]."
            )
        latents = latents.to(device=self.autoencoder.device, dtype=self.autoencoder.dtype)
        return decode_latents(self.tokenizer, self.language_model, self.autoencoder, latents, **generate_kwargs)

    @torch.no_grad()
    def interpolate(
        self, text_a: str, text_b: str, num_steps: int = 5, method: str = "slerp", **generate_kwargs
    ) -> list[str]:
        """Decode ``num_steps`` points on the path from ``text_a``'s latents to ``text_b``'s (ends included),
        by ``method`` ``"slerp"`` or ``"lerp"`` (see `latentlm.pipelines.interpolation`)."""
        z_a, z_b = self.encode([text_a, text_b]).chunk(2)  # [1, N, D] each
        path = interpolation_path(z_a, z_b, num_steps, method)
        return self.decode(path, **generate_kwargs)
