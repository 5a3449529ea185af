"""Training checkpoints: atomic, safetensors-only folders ``<root>/checkpoints/step_XXXXXXXX`` holding
the trainable weights, the optimizer and lr-scheduler state, the EMA weights and a JSON trainer state,
stamped with a fingerprint of the run's config so that a run never resumes another run's weights,
and a sha256 of every file (``checksums.json``) so that a damaged checkpoint is found before it is
read: resume then takes the newest intact one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latentlm.files import atomic_directory
from latentlm.training.optimization import apply_scheduled_lr

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "DamagedCheckpointError",
    "verify_checkpoint",
    "RESUMABLE_KEYS",
    "StaleCheckpointsError",
    "read_ema_shadow",
    "run_fingerprint",
]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from the current config."""


class StaleCheckpointsError(RuntimeError):
    """The checkpoint folder holds checkpoints of another run (another config or seed)."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint's files are not the ones written (truncated, changed or missing)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2))


def verify_checkpoint(path: str | Path) -> None:
    """Raise `DamagedCheckpointError` naming the first file of checkpoint ``path`` whose sha256 differs
    from the one recorded when it was written (or that is missing). Checkpoints written before
    checksums were recorded are only checked for a readable trainer state."""
    path = Path(path)
    sums_file = path / CHECKSUMS_FILE
    try:
        sums = json.loads(sums_file.read_text()) if sums_file.is_file() else None
        if sums is None:
            json.loads((path / "trainer_state.json").read_text())
            return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpointError(f"{str(path)!r}: unreadable ({err}).") from err
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(f"{str(file)!r} is missing.")
        if _sha256(file) != expected:
            raise DamagedCheckpointError(
                f"{str(file)!r} is not the file written at this checkpoint (its sha256 differs)."
            )


# Settings that may change between a run and its resumption: the cadence of logs, evaluations and
# checkpoints, and how long the run goes on and on which learning-rate schedule (so a run can be
# extended, or a constant-rate checkpoint branched into a decay). The model, data and seed may not.
RESUMABLE_KEYS = frozenset(
    {
        "eval_every",
        "save_every",
        "log_every",
        "keep_last_checkpoints",
        "sample_every",
        "num_samples_per_class",
        "sample_inference_steps",
        "time_budget_minutes",
        "num_eval_examples",
        "eval_num_beams",
        "max_eval_samples",
        "max_truncated_fraction",
        "max_steps",
        "lr_schedule",
        "decay_steps",
        "infill_generate_kwargs",  # the pipeline's decoding of gaps; trains nothing
    }
)


def run_fingerprint(*sections: Any) -> str:
    """sha256 (16 hex) of the config sections that determine a run (dataclasses or plain values),
    without the settings a resumed run may change (`RESUMABLE_KEYS`)."""

    def strip(value):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in RESUMABLE_KEYS}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    payload = json.dumps([strip(section) for section in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (``requires_grad``), detached and contiguous."""
    return {
        name: param.detach().contiguous().clone() for name, param in module.named_parameters() if param.requires_grad
    }


def read_ema_shadow(checkpoint: str | Path) -> list[torch.Tensor]:
    """A checkpoint's EMA weights (``ema.safetensors``): one tensor per trainable parameter, in order."""
    shadow = load_file(str(Path(checkpoint) / "ema.safetensors"))
    return [shadow[f"shadow.{i}"] for i in range(len(shadow))]


class CheckpointManager:
    """Atomic, safetensors-only training checkpoints under ``<output_dir>/checkpoints/step_XXXXXXXX``.

    Call ``save`` from the main process only, then ``accelerator.wait_for_everyone()``.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 2, fingerprint: str | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.fingerprint = fingerprint

    def prepare(self, resume: bool, overwrite: bool = False) -> Path | None:
        """Check the folder before a run starts; returns the checkpoint to resume from (or None).

        Leftovers of a killed save (``.tmp-*`` / ``.old-*`` folders) are removed. A fresh run
        (``resume=False``) refuses a folder that already holds checkpoints unless ``overwrite``
        (then they are deleted); a resumed run refuses checkpoints written under another config
        or seed (their fingerprint differs) unless ``overwrite``, which starts over.
        """
        if self.root.is_dir():
            for leftover in list(self.root.glob(".tmp-*")) + list(self.root.glob(".old-*")):
                shutil.rmtree(leftover, ignore_errors=True)
        found = self.checkpoints()
        if not found:
            return None
        if overwrite:
            for path in found:
                shutil.rmtree(path)
            return None
        if not resume:
            raise StaleCheckpointsError(
                f"{str(self.root)!r} already holds checkpoints of an earlier run ({found[-1].name}). Pass --resume to "
                f"continue it, --overwrite to delete them and start over, or choose another output_dir."
            )
        latest = self._newest_intact(found)
        saved = json.loads((latest / "trainer_state.json").read_text()).get("fingerprint")
        if self.fingerprint is not None and saved is not None and saved != self.fingerprint:
            raise StaleCheckpointsError(
                f"{str(latest)!r} was written by a run with another config or seed (fingerprint {saved}, this run "
                f"{self.fingerprint}). Resume with the config it was trained with, pass --overwrite to start over, "
                f"or choose another output_dir."
            )
        return latest

    @staticmethod
    def _newest_intact(found: list[Path]) -> Path:
        """The newest checkpoint whose files verify; a damaged one is named in a warning and skipped."""
        damaged = []
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except DamagedCheckpointError as err:
                logger.warning("Skipping damaged checkpoint %s: %s", path.name, err)
                damaged.append(str(err))
                continue
            if damaged:
                logger.warning("Resuming from %s, the newest intact checkpoint.", path.name)
            return path
        raise DamagedCheckpointError(
            f"Every checkpoint in {str(found[0].parent)!r} is damaged: "
            + "; ".join(damaged)
            + " Pass --overwrite to start over."
        )

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / "trainer_state.json").is_file())

    def latest(self) -> Path | None:
        """The newest intact checkpoint (None without any)."""
        found = self.checkpoints()
        return self._newest_intact(found) if found else None

    def save(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        ema: Any = None,
        extra_state: dict[str, Any] | None = None,
    ) -> Path:
        final = self.root / f"step_{step:08d}"
        with atomic_directory(final) as tmp:
            for name, module in modules.items():
                save_file(trainable_state_dict(module), str(tmp / f"{name}.safetensors"))
            optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
            save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
            state: dict[str, Any] = {
                "step": step,
                "modules": sorted(modules),
                "optimizer": optim_meta,
                "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
                "extra_state": extra_state or {},
                "fingerprint": self.fingerprint,
            }
            if ema is not None:
                ema_state = ema.state_dict()
                shadow = {
                    f"shadow.{i}": p.detach().contiguous().clone() for i, p in enumerate(ema_state["shadow_params"])
                }
                save_file(shadow, str(tmp / "ema.safetensors"))
                state["ema"] = {k: v for k, v in ema_state.items() if k not in ("shadow_params", "collected_params")}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            _write_checksums(tmp)
        # Oldest first; a kill during this clean-up leaves whole checkpoints only (each is one folder,
        # removed by renaming it away first), so resume still finds the newest.
        for old in self.checkpoints()[: -self.keep_last] if self.keep_last > 0 else []:
            trash = old.parent / f".old-{old.name}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return final

    def load(
        self,
        path: str | Path,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        ema: Any = None,
    ) -> dict[str, Any]:
        """Restore a checkpoint in place; returns the trainer state (``step``, ``extra_state``)."""
        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a checkpoint folder (no trainer_state.json).")
        state = json.loads(state_file.read_text())
        if sorted(modules) != state["modules"]:
            raise CheckpointMismatchError(
                f"Checkpoint {str(path)!r} holds modules {state['modules']} but the run trains {sorted(modules)}."
            )
        for name, module in modules.items():
            saved = load_file(str(path / f"{name}.safetensors"))
            expected = {n: p for n, p in module.named_parameters() if p.requires_grad}
            missing = sorted(set(expected) - set(saved))
            unexpected = sorted(set(saved) - set(expected))
            if missing or unexpected:
                raise CheckpointMismatchError(
                    f"Checkpoint {str(path)!r} does not fit module {name!r}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}. Was it written with another config?"
                )
            for key, tensor in saved.items():
                if tensor.shape != expected[key].shape:
                    raise CheckpointMismatchError(
                        f"Checkpoint {str(path)!r}: {name}.{key} has shape {tuple(tensor.shape)} but the model "
                        f"built from the config has {tuple(expected[key].shape)}. Use the config it was trained with."
                    )
            with torch.no_grad():
                for key, tensor in saved.items():
                    expected[key].copy_(tensor)
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        )
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        # The restored optimizer holds the rate the saved schedule set; a resumed run may run another
        # schedule or length, so its first step already takes the rate its own schedule gives.
        apply_scheduled_lr(lr_scheduler)
        if ema is not None:
            if "ema" not in state:
                raise CheckpointMismatchError(f"Checkpoint {str(path)!r} has no EMA weights but the run uses EMA.")
            ema_state = dict(state["ema"])
            ema_state["shadow_params"] = read_ema_shadow(path)
            ema.load_state_dict(ema_state)
        return {"step": state["step"], "extra_state": state["extra_state"]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # e.g. LambdaLR's lr_lambdas: functions are rebuilt from the config, not saved


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
