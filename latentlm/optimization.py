"""The optimizer and learning-rate schedule every training stage uses (AdamW, warmup, then decay)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from transformers import get_scheduler

if TYPE_CHECKING:
    from latentlm.config import OptimizerConfig

__all__ = ["LR_SCHEDULES", "make_lr_scheduler", "make_optimizer"]

#: ``optimizer.lr_schedule`` values -> transformers scheduler names.
LR_SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
    "warmup_stable_decay": "warmup_stable_decay",
}


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or param groups, which may carry their own ``lr``)."""
    params = list(params)
    if not params:
        raise ValueError("No trainable parameters were given to the optimizer: check which modules are frozen.")
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    # The fused kernel is much faster than AdamW's per-tensor loop on CPU; devices/dtypes without it
    # fall back to the loop.
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup for ``warmup_steps``, then linear/cosine decay to zero at ``max_steps`` (or constant).

    ``warmup_stable_decay`` holds the peak rate after the warmup and decays it linearly to zero over
    the last ``decay_steps``. Until the decay starts it is the ``constant`` schedule, so a checkpoint
    of a constant-rate run can be resumed under it to branch off a decay (the schedule and
    ``max_steps`` may change on resume, see `latentlm.checkpoints.RESUMABLE_KEYS`)."""
    wsd = cfg.lr_schedule == "warmup_stable_decay"
    return get_scheduler(
        LR_SCHEDULES[cfg.lr_schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
        scheduler_specific_kwargs={"num_decay_steps": cfg.decay_steps, "decay_type": "linear"} if wsd else None,
    )
