"""Long texts on a pipeline trained on segments (``data.segments``): stories written segment by
segment, each one generated in the context of the text so far, and gaps filled between two texts.

The denoiser reads a segment's context (the text around it, with the gap marker where the segment
goes) through the text-to-text cross-attention, so every segment is one ordinary pipeline call.
"""

from __future__ import annotations

import torch
from latentlm.pipelines.pipeline_output import LatentTextDiffusionPipelineOutput

from latentlm.data.segments import segment_context, split_sentences

__all__ = ["LongTextMixin"]


class LongTextMixin:
    """``pipe(num_samples=2, num_segments=5)``, ``pipe(prompt_texts=[...], num_segments=3)`` and
    ``pipe(infill=[(left, right)])`` for a `LatentTextDiffusionPipeline` trained on segments."""

    def check_segments(self) -> None:
        if not self.config.get("segments"):
            raise ValueError(
                "This pipeline was not trained on segments, so it cannot write long texts segment by segment or "
                "fill gaps: train one with data.segments: true (e.g. configs/rocstories.yaml)."
            )

    def write_long_text(
        self, num_samples, class_labels, *, num_segments, prompt_texts, infill, generator, options, return_dict
    ):
        """Stories of ``num_segments`` segments (one per sample, or continuing each of ``prompt_texts``),
        or the segments that fill each ``(left, right)`` gap of ``infill``. A segment is one sentence:
        where the decoder writes more, the first is kept and the output counts the others
        (``trimmed_segments``)."""
        self.check_segments()
        if infill is not None:
            if num_segments is not None or prompt_texts is not None:
                raise ValueError("infill fills one gap per (left, right) pair: drop num_segments and prompt_texts.")
            pairs = [tuple(pair) for pair in infill]
            if not pairs or any(len(pair) != 2 or not all(isinstance(s, str) for s in pair) for pair in pairs):
                raise ValueError(f"infill takes a list of (left text, right text) pairs, got {infill!r}.")
            contexts, starts, num_segments = [segment_context(left, right) for left, right in pairs], None, 1
        else:
            num_segments = 1 if num_segments is None else num_segments
            if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
                raise ValueError(f"num_segments must be a positive integer, got {num_segments!r}.")
            if prompt_texts is not None and num_samples is not None:
                raise ValueError("With prompt_texts there is one text per prompt: drop num_samples.")
            starts = list(prompt_texts) if prompt_texts is not None else [""] * (num_samples or 1)
        written: list[list[str]] = [[] for _ in (pairs if infill is not None else starts)]
        trimmed, latents = 0, []
        for _ in range(num_segments):
            if starts is not None:
                contexts = [segment_context(" ".join([start, *segments])) for start, segments in zip(starts, written)]
            output = self(source_texts=contexts, class_labels=class_labels, generator=generator, options=options)
            latents.append(output.latents)
            for segments, texts in zip(written, output.texts):
                sentences = split_sentences(texts[0]) or [""]
                segments.append(sentences[0])
                trimmed += len(sentences) > 1
        if starts is None:
            texts = [segments[0] for segments in written]
        else:
            texts = [" ".join(part for part in (start, *segments) if part) for start, segments in zip(starts, written)]
        result = LatentTextDiffusionPipelineOutput(
            texts=texts, latents=torch.stack(latents, dim=1), segments=written, trimmed_segments=trimmed
        )
        return result if return_dict else (result.texts, result.latents)
