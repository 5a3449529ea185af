"""The output of a `LatentTextDiffusionPipeline` call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

__all__ = ["LatentTextDiffusionPipelineOutput"]


@dataclass
class LatentTextDiffusionPipelineOutput(BaseOutput):
    """Output of `LatentTextDiffusionPipeline.__call__`.

    Args:
        texts: the decoded samples (``None`` when ``output_type="latent"``); with ``source_texts``, one
            list of ``num_samples_per_source`` texts per source.
        latents: the clean latents ``[batch, num_latents, latent_dim]`` (float32; with sources, source
            by source); of a long text, ``[batch, num_segments, num_latents, latent_dim]``.
        segments: a long text's segments, one list per text (else ``None``).
        trimmed_segments: how many segments the decoder wrote more than one sentence for (the first
            was kept); ``None`` for a call that writes no long text.
        redrawn_segments: how many segments were drawn again because the decoder wrote them empty,
            unfinished, or cut short (`SamplingOptions.segment_retries`, `SamplingOptions.cut_sentence_logprob`);
            ``None`` for a call that writes no long text.
        unfinished_segments: how many segments were still empty, unfinished or cut short after the last retry (kept
            as written); ``None`` for a call that writes no long text. With
            `SamplingOptions.infill_candidates`, the three count the kept fillings only.
    """

    texts: list[str] | list[list[str]] | None
    latents: torch.Tensor
    segments: list[list[str]] | None = None
    trimmed_segments: int | None = None
    redrawn_segments: int | None = None
    unfinished_segments: int | None = None
