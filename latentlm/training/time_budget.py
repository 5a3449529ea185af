"""A stage's time budget: a warmup-stable-decay schedule whose decay is fitted to end inside it."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["PACE_WINDOW", "budget_decay_end", "log_fitted_decay"]

#: steps over which the pace (seconds per step) is measured when a decay is fitted to the time budget
PACE_WINDOW = 20


def budget_decay_end(
    step: int, train_time_s: float, seconds_per_step: float, time_budget_s: float, max_steps: int, decay_steps: int
) -> int | None:
    """Where a warmup-stable-decay run should end if its decay started now, or None to keep its schedule.

    The decay takes the same share of the time budget as of the steps (``decay_steps / max_steps``):
    once ``train_time_s`` reaches the rest of the budget before step ``max_steps - decay_steps``, the
    decay starts at ``step`` and ends where the budget will, at the current pace. A machine too slow
    for ``max_steps`` in the budget so still ends with the rate at zero instead of being cut off at
    the peak rate.
    """
    share = decay_steps / max_steps
    if step >= max_steps - decay_steps or train_time_s < (1.0 - share) * time_budget_s:
        return None
    end = step + max(1, round((time_budget_s - train_time_s) / seconds_per_step))
    return end if end < max_steps else None


def log_fitted_decay(start: int, end: int, seconds_left: float, seconds_per_step: float, opt) -> None:
    logger.warning(
        "Time budget: the learning rate decays to zero from step %d to step %d (%.0f s left at "
        "%.2f s/step) instead of over the last %d of %d steps.",
        start,
        end,
        seconds_left,
        seconds_per_step,
        opt.decay_steps,
        opt.max_steps,
    )
