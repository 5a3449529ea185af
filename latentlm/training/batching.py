"""Step-addressed data order and per-step seeding: what makes resuming exact.

The batch at step ``k`` and the random numbers drawn at step ``k`` (dropout, noise, timesteps) are
functions of ``(seed, k)`` alone, so a run killed after step ``k`` and resumed from its checkpoint
repeats the uninterrupted run step for step, with no RNG state saved.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["seed_step", "batch_indices", "class_balanced_order", "LENGTH_GROUP_BATCHES"]


def seed_step(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """Seed the global torch RNG for one training step and return a generator seeded the same way."""
    step_seed = (seed * 1_000_003 + step * 9_973 + process_index * 7_919) % (2**63 - 1)
    torch.manual_seed(step_seed)
    generator = torch.Generator()
    generator.manual_seed(step_seed)
    return generator


# How many batches share one length-sorted mega-batch (transformers' LengthGroupedSampler uses 50).
LENGTH_GROUP_BATCHES = 50


@functools.lru_cache(maxsize=4)
def _epoch_permutation(
    num_examples: int, seed: int, epoch: int, batch_size: int = 0, lengths: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    if lengths is None:
        return tuple(order.tolist())
    # Group by length (as transformers' `group_by_length`): sort each mega-batch of
    # LENGTH_GROUP_BATCHES random batches by length, cut it into batches and shuffle their order.
    # A batch is padded to its longest text only, so similar lengths waste less compute on padding.
    lengths_t = torch.tensor(lengths)
    mega = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, num_examples, mega):
        chunk = order[start : start + mega]
        chunk = chunk[torch.argsort(lengths_t[chunk], descending=True, stable=True)]
        batches.extend(chunk.split(batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return tuple(torch.cat([batches[i] for i in shuffled]).tolist())


def batch_indices(
    num_examples: int,
    batch_size: int,
    step: int,
    seed: int,
    process_index: int = 0,
    num_processes: int = 1,
    lengths: tuple[int, ...] | None = None,
) -> list[int]:
    """Indices of this process's share of the global batch number ``step``.

    The data are visited in a fresh random order every epoch; ``batch_size`` is the global batch,
    split evenly over ``num_processes``, so one process or several see the same examples per step.
    With ``lengths`` (one per example, as a tuple), each batch holds texts of similar length.
    """
    if num_examples <= 0:
        raise ValueError("The training set is empty: there is nothing to draw batches from.")
    if batch_size % num_processes:
        raise ValueError(
            f"batch_size={batch_size} does not split evenly over {num_processes} processes; "
            f"use a multiple of {num_processes}."
        )
    if lengths is not None and len(lengths) != num_examples:
        raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples; give one per example.")
    per_process = batch_size // num_processes
    position = step * batch_size + process_index * per_process
    indices: list[int] = []
    while len(indices) < per_process:
        epoch, offset = divmod(position, num_examples)
        take = min(per_process - len(indices), num_examples - offset)
        order = _epoch_permutation(num_examples, seed, epoch, batch_size if lengths is not None else 0, lengths)
        indices.extend(order[offset : offset + take])
        position += take
    return indices


def class_balanced_order(labels, seed: int) -> list[int]:
    """Example indices in which every class occurs as often as the largest one, for drawing batches
    with `batch_indices` over its positions: a class of ``n`` examples is repeated whole
    ``largest // n`` times, plus ``largest % n`` of its examples chosen at random (from ``seed``).
    Each epoch over this order then sees every class equally often."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of class ids, got shape {tuple(labels.shape)}.")
    generator = torch.Generator().manual_seed(seed * 100_003 + 17)
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    largest = max(len(m) for m in members)
    order = []
    for m in members:
        repeats, rest = divmod(largest, len(m))
        order.append(m.repeat(repeats))
        order.append(m[torch.randperm(len(m), generator=generator)[:rest]])
    return torch.cat(order).tolist()
