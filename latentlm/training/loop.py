"""The training loop every stage runs (`run_stage` over a `TrainingStage`), with non-finite loss checks;
accelerate set-up is in `latentlm.training.precision`, data order and seeding in `.batching`.

Resuming is exact by construction rather than by saving RNG states: the batch at step ``k`` and
the random numbers drawn at step ``k`` (dropout, noise, timesteps) are functions of ``(seed, k)``
alone, so a run killed after step ``k`` and resumed from its checkpoint repeats the uninterrupted
run step for step.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from latentlm.files import atomic_directory, write_json_atomic
from latentlm.training.batching import batch_indices, seed_step
from latentlm.training.checkpoints import CheckpointManager, run_fingerprint
from latentlm.training.optimization import decay_between
from latentlm.training.precision import make_accelerator
from latentlm.training.time_budget import PACE_WINDOW, budget_decay_end, log_fitted_decay

if TYPE_CHECKING:
    from latentlm.config import RunConfig
    from latentlm.mlflow.tracking import Tracker

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def check_finite(losses: torch.Tensor, first_step: int) -> None:
    """Stop with advice when a loss is NaN/inf instead of training on garbage. ``losses``: those of the
    steps from ``first_step`` on, checked at once: an accelerator's queue stalls once per log interval."""
    losses = losses.detach().float().reshape(-1)
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(
            f"The training loss became {losses[bad].item()} at step {first_step + bad}. Lower "
            "optimizer.learning_rate, raise optimizer.warmup_steps, keep optimizer.max_grad_norm set, or use "
            "mixed_precision 'bf16'/'no' instead of 'fp16'; then continue from the last checkpoint with --resume."
        )


class TrainingStage:
    """One stage of training, run by `run_stage`: the stage builds its data and models and says how
    one step goes; the loop owns resume, tracking, cadence, the time budget, checkpoints and the
    final save.

    A stage sets, in `setup`: ``modules`` (name -> module whose trainable weights are checkpointed),
    ``optimizer``, ``lr_scheduler`` and ``train_model`` (what ``accelerator.prepare`` returned);
    optionally ``ema`` (a diffusers `EMAModel`, checkpointed and stepped by the loop).
    """

    #: short name: the MLflow run ``train-<name>`` and the progress bar
    name: str = "stage"
    #: folders and files under ``output_dir``
    final_dir: str = "model"
    checkpoint_dir: str = "training"
    history_file: str = "history.json"

    ema = None

    def __init__(self, config: RunConfig, stage_config):
        self.config = config
        self.cfg = stage_config

    # -- what a stage supplies
    def setup(self, accelerator: Accelerator) -> None:
        raise NotImplementedError

    def batch_indices(self, step: int, num_examples: int, lengths: tuple[int, ...] | None = None) -> list[int]:
        """This process's share of global batch ``step`` over ``num_examples`` (see `batch_indices`)."""
        accelerator = self.accelerator
        return batch_indices(
            num_examples,
            self.cfg.optimizer.batch_size,
            step,
            self.cfg.seed,
            accelerator.process_index,
            accelerator.num_processes,
            lengths=lengths,
        )

    def fingerprint(self) -> str:
        """What determines the run: a resumed run must have the same (see `run_fingerprint`)."""
        return run_fingerprint(self.cfg, self.config.data)

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """The loss of global batch ``step``. The loop has seeded the global RNG for this step (and
        ``generator`` the same way); it backpropagates and steps the optimizer."""
        raise NotImplementedError

    def after_step(self, step: int) -> dict[str, float]:
        """After the optimizer step (the loop has stepped ``ema``); returns extra metrics to log."""
        return {}

    @property
    def eval_every(self) -> int:
        """Evaluate every this many steps (0: never during training)."""
        return 0

    @property
    def evaluate_at_end(self) -> bool:
        """Evaluate once more after the last step."""
        return bool(self.eval_every)

    def evaluate(self, step: int, tracker: Tracker) -> dict[str, Any] | None:
        """Main process only: evaluate, log, and return an entry for the history (or None)."""
        return None

    def params(self) -> dict[str, Any]:
        """Logged once, when the run starts, beside the config."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state beyond weights, optimizer and EMA, saved in every checkpoint."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save(self, folder: Path) -> None:
        """Write the trained model into ``folder`` (a temporary folder renamed into place)."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Extra entries of the history file."""
        return {}


class _RunState:
    """Where a stage's run stands (step, evaluations, loss curve, training time) and its checkpoints."""

    def __init__(self, stage: TrainingStage, accelerator: Accelerator):
        self.stage, self.accelerator = stage, accelerator
        self.is_main = accelerator.is_main_process
        self.checkpoints = CheckpointManager(
            Path(stage.config.output_dir) / stage.checkpoint_dir,
            keep_last=stage.cfg.keep_last_checkpoints,
            fingerprint=stage.fingerprint(),
        )
        self.step, self.history, self.loss_curve, self.train_time = 0, [], [], 0.0
        self.out_of_time = False  # the time budget ended the run before max_steps
        # (start, end) of a warmup-stable-decay run's decay, moved forward to end inside the time budget
        self.budget_decay: tuple[int, int] | None = None

    @property
    def end_step(self) -> int:
        """The step the run ends at: ``max_steps``, or the end of a decay fitted to the time budget."""
        return self.budget_decay[1] if self.budget_decay else self.stage.cfg.optimizer.max_steps

    def fit_decay(self, start: int, end: int) -> None:
        """Decay the learning rate to zero from step ``start`` to ``end`` (`decay_between`), and end there."""
        decay_between(self.stage.lr_scheduler, start, end)
        self.budget_decay = (start, end)

    def restore(self, resume: bool, overwrite: bool) -> None:
        """Check the checkpoint folder (see `CheckpointManager.prepare`) and, on resume, load the latest."""
        latest = self.checkpoints.prepare(resume, overwrite) if self.is_main else None
        self.accelerator.wait_for_everyone()
        if not resume:
            return
        if not self.is_main:
            latest = self.checkpoints.latest()
        if latest is None:
            if self.is_main:
                logger.warning("--resume: no checkpoint in %s; starting from step 0.", self.checkpoints.root)
            return
        stage = self.stage
        state = self.checkpoints.load(latest, stage.modules, stage.optimizer, stage.lr_scheduler, ema=stage.ema)
        extra = state["extra_state"]
        self.step, self.history, self.loss_curve = state["step"], extra.pop("history", []), extra.pop("loss_curve", [])
        self.train_time = float(extra.pop("train_time_s", 0.0))
        budget_decay = extra.pop("budget_decay", None)
        if budget_decay is not None:
            self.fit_decay(*budget_decay)
        stage.load_extra_state(extra)
        if self.is_main:
            logger.warning("Resumed from %s (step %d).", latest, self.step)

    def save_checkpoint(self) -> None:
        stage = self.stage
        if self.is_main:
            extra = {
                "history": self.history,
                "loss_curve": self.loss_curve,
                "train_time_s": self.train_time,
                "budget_decay": self.budget_decay,
                **stage.extra_state(),
            }
            self.checkpoints.save(
                self.step, stage.modules, stage.optimizer, stage.lr_scheduler, ema=stage.ema, extra_state=extra
            )
        self.accelerator.wait_for_everyone()

    def evaluate(self, tracker: Tracker) -> None:
        entry = self.stage.evaluate(self.step, tracker) if self.is_main else None
        if entry is not None:
            self.history.append({"step": self.step, **entry, "train_time_s": round(self.train_time, 1)})


def _optimizer_step(stage: TrainingStage, accelerator: Accelerator, step: int, trainable: list) -> torch.Tensor:
    """One training step of ``stage``; returns the loss averaged over processes, still on the device (the
    loop checks and reads the losses back once per log interval, `check_finite`)."""
    cfg = stage.cfg
    generator = seed_step(cfg.seed, step, accelerator.process_index)
    loss = stage.training_step(step, generator)
    # The same value on every process, so a NaN anywhere stops all of them (no hung all-reduce).
    global_loss = accelerator.reduce(loss.detach().float(), reduction="mean")
    accelerator.backward(loss)
    if cfg.optimizer.max_grad_norm and cfg.optimizer.max_grad_norm > 0:
        accelerator.clip_grad_norm_(trainable, cfg.optimizer.max_grad_norm)
    stage.optimizer.step()
    stage.lr_scheduler.step()
    stage.optimizer.zero_grad(set_to_none=True)
    if stage.ema is not None:
        stage.ema.step(trainable)
    return global_loss


def _step_seconds(accelerator: Accelerator, seconds: float) -> float:
    """The slowest process's time for the step, so that every process makes the same time-budget calls."""
    one = accelerator.num_processes == 1
    return seconds if one else accelerator.gather(torch.tensor([seconds], device=accelerator.device)).max().item()


def _train_steps(run: _RunState, tracker: Tracker, time_budget_s: float | None) -> None:
    """Steps from ``run.step`` to ``max_steps`` (or the time budget), logging, evaluating and saving.

    With a time budget, a ``warmup_stable_decay`` schedule's decay starts early enough to end inside
    it (`budget_decay_end`)."""
    stage, accelerator = run.stage, run.accelerator
    cfg, opt, start = stage.cfg, stage.cfg.optimizer, run.step
    trainable = [p for group in stage.optimizer.param_groups for p in group["params"]]
    fit_decay = time_budget_s is not None and opt.lr_schedule == "warmup_stable_decay"
    progress = tqdm(initial=start, total=run.end_step, desc=f"train-{stage.name}", disable=not run.is_main)
    stage.train_model.train()
    running, checked = [], 0  # the losses since the last log (on the device); how many were checked
    pace: collections.deque[float] = collections.deque(maxlen=PACE_WINDOW)
    step, out_of_time = start, False
    while step < run.end_step:
        tick = time.perf_counter()
        running.append(_optimizer_step(stage, accelerator, step, trainable))
        extra_metrics = stage.after_step(step)
        seconds = _step_seconds(accelerator, time.perf_counter() - tick)
        run.train_time += seconds
        pace.append(seconds)
        run.step = done = step + 1
        progress.update(1)
        if fit_decay and run.budget_decay is None and len(pace) == PACE_WINDOW:
            end = budget_decay_end(
                done, run.train_time, sum(pace) / len(pace), time_budget_s, opt.max_steps, opt.decay_steps
            )
            if end is not None:
                run.fit_decay(done, end)
                progress.total = end
                if run.is_main:
                    log_fitted_decay(done, end, time_budget_s - run.train_time, sum(pace) / len(pace), opt)
        last = done == run.end_step
        out_of_time = time_budget_s is not None and run.train_time >= time_budget_s
        evaluate = bool(stage.eval_every) and done % stage.eval_every == 0 and not last and not out_of_time
        save = done % cfg.save_every == 0 or last or out_of_time
        if done % cfg.log_every == 0 or last or evaluate or save:
            # every loss so far is finite before anything is logged, evaluated or saved
            check_finite(torch.stack(running[checked:]), done - len(running) + checked)
            checked = len(running)
        if done % cfg.log_every == 0 or last:
            mean_loss = torch.stack(running).mean().item()
            running, checked = [], 0
            lrs = {f"lr/{g['name']}" if "name" in g else "lr": g["lr"] for g in stage.optimizer.param_groups}
            tracker.log_metrics(
                {
                    "train/loss": mean_loss,
                    **lrs,
                    **extra_metrics,
                    "train/steps_per_s": (done - start) / max(run.train_time, 1e-9),
                },
                done,
            )
            run.loss_curve.append({"step": done, "loss": mean_loss, "train_time_s": round(run.train_time, 1)})
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        if evaluate:
            run.evaluate(tracker)
        if save:
            run.save_checkpoint()
        if out_of_time:
            if run.is_main:
                logger.warning("Time budget of %.0f s reached after %d steps.", time_budget_s, done)
            break
        step = done
    # the time budget ended the run before max_steps: cut short, or by a decay fitted to it
    run.out_of_time = run.step < opt.max_steps and (out_of_time or run.budget_decay is not None)
    progress.close()


def _save_final(run: _RunState, tracker: Tracker) -> Path:
    """The trained model to ``<output_dir>/<final_dir>`` and the history file, atomically."""
    stage = run.stage
    output_dir = Path(stage.config.output_dir)
    final = output_dir / stage.final_dir
    if run.is_main:
        with atomic_directory(final) as tmp:
            stage.save(tmp)
        write_json_atomic(
            output_dir / stage.history_file,
            {
                "final_step": run.step,
                "train_time_s": round(run.train_time, 1),
                "time_budget_reached": run.out_of_time,
                "mixed_precision": run.accelerator.mixed_precision,  # as resolved on this machine
                "budget_decay": list(run.budget_decay) if run.budget_decay else None,
                **stage.summary(),
                "history": run.history,
                "loss_curve": run.loss_curve,
            },
        )
        tracker.log_artifact(output_dir / stage.history_file)
        last = run.history[-1] if run.history else {}
        finals = {
            f"final/{k}": v
            for k, v in last.items()
            if k not in ("step", "train_time_s") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if finals:
            tracker.log_metrics(finals, run.step)
    run.accelerator.wait_for_everyone()
    return final


def run_stage(
    stage: TrainingStage,
    *,
    resume: bool = False,
    tracker: Tracker | None = None,
    time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Train ``stage`` to ``optimizer.max_steps``; returns ``<output_dir>/<stage.final_dir>``.

    Args:
        resume: continue from the latest checkpoint in ``<output_dir>/<stage.checkpoint_dir>``.
        overwrite: delete checkpoints of an earlier run there instead of refusing to start
            (see `CheckpointManager.prepare`).
        tracker: an open `Tracker` to log into; by default a new MLflow run is opened (and closed).
        time_budget_s: stop once this many seconds were spent in training steps (evaluation time not
            counted); the final evaluation and save still happen. None = the stage config's
            ``time_budget_minutes`` (itself None = no limit).

    Resuming is exact: batch and random numbers of step ``k`` depend on ``(seed, k)`` only.
    """
    from latentlm.mlflow.tracking import Tracker

    config = stage.config
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(stage.cfg.mixed_precision, stage.cfg.seed)
    stage.accelerator = accelerator
    stage.setup(accelerator)
    run = _RunState(stage, accelerator)
    run.restore(resume, overwrite)

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(
            config.tracking,
            run_name=config.tracking.run_name or f"train-{stage.name}",
            fallback_dir=output_dir,
            active=run.is_main,
            resume=resume,
        )
        tracker.start()
    try:
        if run.is_main and run.step == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            config.save(output_dir / "config.yaml")
            tracker.log_params(config.to_dict())
            tracker.log_params(stage.params())
            tracker.log_artifact(output_dir / "config.yaml")
        if time_budget_s is None and stage.cfg.time_budget_minutes is not None:
            time_budget_s = 60.0 * stage.cfg.time_budget_minutes
        _train_steps(run, tracker, time_budget_s)
        if stage.evaluate_at_end:
            run.evaluate(tracker)
        final = _save_final(run, tracker)
    except BaseException:
        if own_tracker:
            tracker.close(status="FAILED")
        raise
    if own_tracker:
        tracker.close()
    return final
