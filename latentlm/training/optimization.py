"""The optimizer and learning-rate schedule every training stage uses (AdamW, warmup, then decay)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from transformers import get_scheduler

from latentlm.config import LR_SCHEDULES, OptimizerConfig

__all__ = ["LR_SCHEDULES", "apply_scheduled_lr", "decay_between", "make_lr_scheduler", "make_optimizer"]


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
    the last ``decay_steps`` (the training loop may move the decay earlier to fit a time budget:
    `decay_between`). Until the decay starts it is the ``constant`` schedule, so a checkpoint
    of a constant-rate run can be resumed under it to branch off a decay (the schedule and
    ``max_steps`` may change on resume, see `latentlm.training.checkpoints.RESUMABLE_KEYS`)."""
    if cfg.lr_schedule == "warmup_stable_decay":
        factor = functools.partial(
            _warmup_stable_decay,
            warmup_steps=cfg.warmup_steps,
            decay_start=cfg.max_steps - cfg.decay_steps,
            decay_end=cfg.max_steps,
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return get_scheduler(
        LR_SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )


def _warmup_stable_decay(step: int, *, warmup_steps: int, decay_start: int, decay_end: int) -> float:
    """The rate factor at ``step``: linear warmup, the peak, then linear to zero from ``decay_start`` to
    ``decay_end`` (as transformers' ``warmup_stable_decay`` with a linear decay and no floor)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step < decay_start:
        return 1.0
    if step < decay_end:
        return 1.0 - (step - decay_start) / max(1, decay_end - decay_start)
    return 0.0


def decay_between(lr_scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, end: int) -> None:
    """Move the decay of a ``warmup_stable_decay`` schedule to the steps ``start`` .. ``end`` (the rate
    reaches zero at ``end``), from its current step on; the optimizer takes the new rate at once."""
    factors = []
    for factor in lr_scheduler.lr_lambdas:
        if not (isinstance(factor, functools.partial) and factor.func is _warmup_stable_decay):
            raise ValueError("decay_between needs a warmup_stable_decay schedule (from make_lr_scheduler).")
        factors.append(functools.partial(factor, decay_start=start, decay_end=end))
    lr_scheduler.lr_lambdas = factors
    apply_scheduled_lr(lr_scheduler)


def apply_scheduled_lr(lr_scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Give the optimizer the rate its schedule sets at the current step (after the schedule or its
    state changed), so that the next step already takes it."""
    step = lr_scheduler.last_epoch
    for group, base_lr, factor in zip(
        lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas
    ):
        group["lr"] = base_lr * factor(step)
