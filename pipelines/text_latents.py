"""Text <-> latents on a pipeline's components: what `LatentTextDiffusionPipeline` offers besides sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch
from latentlm.autoencoder.families import family_of
from latentlm.autoencoder.text_codec import decode_latents, encode_sources, encode_texts
from latentlm.pipelines.interpolation import interpolation_path

from latentlm.data.segments import segment_context, split_sentences, text_segments

__all__ = ["TextLatentsMixin"]


class TextLatentsMixin:
    """``encode`` / ``decode`` / ``encode_sources`` / ``interpolate`` through the pipeline's ``tokenizer``,
    ``language_model`` and ``autoencoder`` (latent shapes from its ``denoiser``)."""

    @torch.no_grad()
    def encode(
        self,
        texts: str | list[str],
        max_length: int | None = None,
        *,
        segments: bool = False,
        splitter: Callable[[str], list[str]] = split_sentences,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Texts -> clean latents ``[B, num_latents, latent_dim]`` (float32).

        With ``segments=True`` every text is a long text: ``splitter`` (sentences by default) cuts it
        into segments, each encoded on its own, and the result is one tensor per text,
        ``[num_segments, num_latents, latent_dim]`` (what `decode` joins back into the text). A segment
        longer than the window (``max_length`` tokens) is an error, not cut."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode() needs at least one text.")
        max_length = max_length or self.config.max_length
        if segments:
            pieces = text_segments(texts, splitter)
            special = family_of(self.language_model).add_special_tokens
            too_long = [
                (i, j, len(ids))
                for i, text in enumerate(pieces)
                for j, ids in enumerate(self.tokenizer(text, add_special_tokens=special)["input_ids"])
                if len(ids) > max_length
            ]
            if too_long:
                i, j, n = too_long[0]
                raise ValueError(
                    f"{len(too_long)} segment(s) are longer than the {max_length} tokens one latent window holds, "
                    f"e.g. segment {j} of text {i} ({n} tokens: {pieces[i][j][:60]!r}); pass a splitter that cuts "
                    "them shorter."
                )
            flat = [piece for text in pieces for piece in text]
            latents = encode_texts(self.tokenizer, self.language_model, self.autoencoder, flat, max_length).float()
            return list(latents.split([len(text) for text in pieces]))
        latents = encode_texts(self.tokenizer, self.language_model, self.autoencoder, texts, max_length)
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
    def decode(
        self, latents: torch.Tensor | list[torch.Tensor], context_texts: list[str] | None = None, **generate_kwargs
    ) -> list[str]:
        """Latents ``[B, num_latents, latent_dim]`` -> texts; or a list of long texts' segment latents
        (each ``[num_segments, num_latents, latent_dim]``, as ``encode(..., segments=True)`` returns) ->
        one text per entry, its decoded segments joined by spaces.

        ``context_texts`` (one per row): what a decoder tuned with ``read_context`` reads before the
        latents. Such a decoder writes a long text's segments one after the other, each reading the
        text decoded so far (`segment_context`). ``generate_kwargs`` override the pipeline's
        ``config.decode_kwargs``, which override `text_codec.DEFAULT_GENERATE_KWARGS` (LD4LG's beam search).
        """
        if isinstance(latents, (list, tuple)):
            if not latents or not all(torch.is_tensor(x) and x.ndim == 3 and len(x) for x in latents):
                raise ValueError(
                    "decode() takes a latent tensor, or a non-empty list of segment latents, each "
                    "[num_segments >= 1, num_latents, latent_dim] (encode(texts, segments=True))."
                )
            if context_texts is not None:
                raise ValueError("A long text's segments read the text decoded before them: drop context_texts.")
            if self.autoencoder.config.get("read_context"):
                written = [[] for _ in latents]
                for k in range(max(len(x) for x in latents)):
                    rows = [i for i, x in enumerate(latents) if k < len(x)]
                    contexts = [segment_context(" ".join(text for text in written[i] if text)) for i in rows]
                    step = self.decode(
                        torch.stack([latents[i][k] for i in rows]), context_texts=contexts, **generate_kwargs
                    )
                    for i, text in zip(rows, step):
                        written[i].append(text)
                return [" ".join(text for text in texts if text) for texts in written]
            texts = iter(self.decode(torch.cat(list(latents)), **generate_kwargs))
            return [" ".join(text for text in (next(texts) for _ in range(len(x))) if text) for x in latents]
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
        return decode_latents(
            self.tokenizer, self.language_model, self.autoencoder, latents, context_texts, **generate_kwargs
        )

    @torch.no_grad()
    def interpolate(
        self, text_a: str, text_b: str, num_steps: int = 5, method: str = "slerp", **generate_kwargs
    ) -> list[str]:
        """Decode ``num_steps`` points on the path from ``text_a``'s latents to ``text_b``'s (ends included),
        by ``method`` ``"slerp"`` or ``"lerp"`` (see `latentlm.pipelines.interpolation`)."""
        z_a, z_b = self.encode([text_a, text_b]).chunk(2)  # [1, N, D] each
        path = interpolation_path(z_a, z_b, num_steps, method)
        return self.decode(path, **generate_kwargs)
