"""What both training loops share: accelerate set-up, AdamW + warmup, step-addressed data order,
per-step seeding, non-finite loss checks and atomic safetensors checkpoints.

Resuming is exact by construction rather than by saving RNG states: the batch at step ``k`` and
the random numbers drawn at step ``k`` (dropout, noise, timesteps) are functions of ``(seed, k)``
alone, so a run killed after step ``k`` and resumed from its checkpoint repeats the uninterrupted
run step for step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from .config import OptimizerConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from the current config."""


class StaleCheckpointsError(RuntimeError):
    """The checkpoint folder holds checkpoints of another run (another config or seed)."""


# Settings that may change between a run and its resumption without changing what is trained.
CADENCE_KEYS = frozenset({
    "eval_every", "save_every", "log_every", "keep_last_checkpoints", "sample_every", "num_samples_per_class",
    "sample_inference_steps", "num_eval_examples", "eval_num_beams", "max_eval_samples", "max_steps",
})


def run_fingerprint(*sections: Any) -> str:
    """sha256 (16 hex) of the config sections that determine a run (dataclasses or plain values),
    without the cadence settings (`CADENCE_KEYS`), which a resumed run may change."""
    import dataclasses
    import hashlib

    def strip(value):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in CADENCE_KEYS}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    payload = json.dumps([strip(section) for section in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_accelerator(mixed_precision: str = "no", seed: int = 0) -> Accelerator:
    """One CPU, one GPU or several processes (``accelerate launch``); bf16 autocast works on CPU too."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16' needs a GPU; on CPU use 'bf16' (or 'no').")
    # Without cpu=True accelerate ignores the torchrun environment on a machine with no accelerator, so
    # `accelerate launch --multi_gpu --num_processes 2` would start 2 independent single-process runs
    # instead of one gloo (MULTI_CPU) run.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    # `latentlm train` runs both stages in one process, each with its own mixed_precision; accelerate
    # keeps one global AcceleratorState and refuses a second setting. Reset that part only: the
    # process group (PartialState) of a multi-process launch stays as it is.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator)
    set_seed(seed)  # same initial weights in every process
    return accelerator


def attention_kernel(device: torch.device):
    """Context for a training step: on CPU, SDPA's math kernel instead of the flash kernel.

    For the short, padded sequences of text autoencoders the CPU flash-attention kernel is slower
    than plain matmuls: a MiniLM BERT2BERT step (batch 32, bf16, 2 threads, random batches) took
    1.87 s with the flash kernel and 1.36 s with the math kernel; with length-grouped batches the
    two are level (`benchmarks/autoencoder_step_time.py`). Elsewhere PyTorch's own choice stands.
    """
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or param groups, which may carry their own ``lr``)."""
    params = list(params)
    if not params:
        raise ValueError("No trainable parameters were given to the optimizer: check which modules are frozen.")
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    # The fused kernel is ~20x faster than AdamW's default per-tensor loop on CPU (2.5 s -> 0.1 s CPU
    # time per step for a 22M-parameter denoiser); devices/dtypes without it fall back to the loop.
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup for ``warmup_steps``, then linear/cosine decay to zero at ``max_steps`` (or constant)."""
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


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
def _epoch_permutation(num_examples: int, seed: int, epoch: int, batch_size: int = 0,
                       lengths: tuple[int, ...] | None = None) -> tuple[int, ...]:
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
    num_examples: int, batch_size: int, step: int, seed: int, process_index: int = 0, num_processes: int = 1,
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


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop with advice when the loss is NaN/inf instead of training on garbage."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"The training loss became {loss.detach().float().item()} at step {step}. Lower "
            "optimizer.learning_rate, raise optimizer.warmup_steps, keep optimizer.max_grad_norm set, or use "
            "mixed_precision 'bf16'/'no' instead of 'fp16'; then continue from the last checkpoint with --resume."
        )


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A run killed half-way through writing leaves only a ``.tmp-*`` folder behind, never a
    half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a synced temporary sibling and one rename: a reader (``--resume``)
    sees the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(obj, indent=2, ensure_ascii=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (``requires_grad``), detached and contiguous."""
    return {
        name: param.detach().contiguous().clone()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


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
        latest = found[-1]
        saved = json.loads((latest / "trainer_state.json").read_text()).get("fingerprint")
        if self.fingerprint is not None and saved is not None and saved != self.fingerprint:
            raise StaleCheckpointsError(
                f"{str(latest)!r} was written by a run with another config or seed (fingerprint {saved}, this run "
                f"{self.fingerprint}). Resume with the config it was trained with, pass --overwrite to start over, "
                f"or choose another output_dir."
            )
        return latest

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / "trainer_state.json").is_file())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

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
                shadow = {f"shadow.{i}": p.detach().contiguous().clone() for i, p in enumerate(ema_state["shadow_params"])}
                save_file(shadow, str(tmp / "ema.safetensors"))
                state["ema"] = {k: v for k, v in ema_state.items() if k not in ("shadow_params", "collected_params")}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
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
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            if "ema" not in state:
                raise CheckpointMismatchError(f"Checkpoint {str(path)!r} has no EMA weights but the run uses EMA.")
            shadow = load_file(str(path / "ema.safetensors"))
            ema_state = dict(state["ema"])
            ema_state["shadow_params"] = [shadow[f"shadow.{i}"] for i in range(len(shadow))]
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
