"""What each training example's denoiser reads as its context: its source text's cached encoder states
(text-to-text, and segments whose context is text), or (``data.segment_context: latents``) the latents
of the other segments of its document that the example's context shows, read from the latent cache."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from latentlm.config import DataConfig
from latentlm.data.loading import load_text_dataset
from latentlm.pipelines.long_text import LATENT_POSITION_DIM, latent_context_states
from latentlm.training.latent_cache import LatentCache

__all__ = ["DenoiserContext", "LatentContextTable"]


class LatentContextTable:
    """Which examples make each example's context, and their place relative to it.

    Example ``i`` (segment ``positions[i]`` of document ``documents[i]``) reads the segments before it
    and, where ``with_right[i]``, those after it: an infilling example sees both sides, a continuation
    only the text so far (as `latentlm.data.segments.segment_examples` drew them).
    """

    def __init__(self, documents: Sequence[int], positions: Sequence[int], with_right: Sequence[bool]):
        if not len(documents) == len(positions) == len(with_right):
            raise ValueError("documents, positions and with_right must have one entry per example.")
        by_document: dict[int, dict[int, int]] = defaultdict(dict)
        for index, (document, position) in enumerate(zip(documents, positions)):
            by_document[int(document)][int(position)] = index
        rows = []
        for document, position, right in zip(documents, positions, with_right):
            segments = by_document[int(document)]
            rows.append(
                [(segments[p], p - position) for p in sorted(segments) if p < position or (right and p > position)]
            )
        width = max(1, max(len(row) for row in rows))  # one padded place where a context is empty
        self.indices = np.zeros((len(rows), width), dtype=np.int64)
        self.offsets = np.zeros((len(rows), width), dtype=np.int64)
        self.present = np.zeros((len(rows), width), dtype=bool)
        for i, row in enumerate(rows):
            for j, (index, offset) in enumerate(row):
                self.indices[i, j], self.offsets[i, j], self.present[i, j] = index, offset, True

    def batch(self, cache: LatentCache, indices: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The context states ``[B, K * N, D + LATENT_POSITION_DIM]`` and mask ``[B, K * N]`` of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        neighbours = self.indices[idx]
        latents = torch.from_numpy(np.ascontiguousarray(cache.latents[neighbours.reshape(-1)])).float()
        latents = latents.reshape(*neighbours.shape, *latents.shape[1:])
        states, mask = latent_context_states(
            latents, torch.from_numpy(self.offsets[idx]), torch.from_numpy(self.present[idx])
        )
        return states.to(device), mask.to(device)


class DenoiserContext:
    """The context of the examples of a stage-2 latent cache, as stage 2 trains on it and the decoder
    tuning after it reads it: the cached source states, the latent context of ``data.segment_context:
    latents``, or none (``width`` is None)."""

    def __init__(self, cache: LatentCache, data: DataConfig):
        self.cache, self.table = cache, None
        self.width = cache.source_dim
        if data.segments and data.segment_context == "latents":
            ds = load_text_dataset(data, data.train_split, data.max_train_samples)
            self.table = LatentContextTable(ds["document"], ds["position"], ds["with_right"])
            self.width = cache.latent_dim + LATENT_POSITION_DIM

    def batch(self, indices: Sequence[int], device=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The context states ``[B, L, width]`` and mask ``[B, L]`` of ``indices`` (None, None without one)."""
        if self.cache.source_states is not None:
            return self.cache.source_batch(indices, device)
        if self.table is not None:
            return self.table.batch(self.cache, indices, device)
        return None, None
