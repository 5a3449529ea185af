"""`latentlm sample`: texts from a saved pipeline folder, as dicts and (optionally) jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["SCHEDULERS", "make_scheduler", "set_scheduler", "load_pipeline", "sample"]

#: Scheduler names accepted by ``--scheduler`` -> (diffusers class name, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(pipe, name: str | None):
    """A new scheduler ``name`` (see `SCHEDULERS`) built from the pipeline's scheduler config
    (``None``: the pipeline's own); pass it to one call as ``pipe(..., scheduler=...)``."""
    if name is None:
        return pipe.scheduler
    import diffusers

    key = str(name).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for ``name`` (see `SCHEDULERS`), built from its own config."""
    pipe.scheduler = make_scheduler(pipe, name)


def load_pipeline(pipeline_dir: str | Path, device: str | torch.device | None = None):
    """`LatentTextDiffusionPipeline.from_pretrained` with the progress bar off (and optionally moved)."""
    from latentlm.pipelines import LatentTextDiffusionPipeline

    pipe = LatentTextDiffusionPipeline.from_pretrained(pipeline_dir)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def sample(
    pipeline_dir: str | Path,
    class_name: str | int | None = None,
    num_samples: int = 16,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 50,
    scheduler: str | None = "dpm++",
    seed: int = 0,
    out: str | Path | None = None,
    *,
    batch_size: int = 64,
    decode_kwargs: dict[str, Any] | None = None,
    pipe=None,
) -> list[dict[str, Any]]:
    """Sample ``num_samples`` texts; returns ``[{"class", "text", "seed", "index"}]`` and writes jsonl to ``out``.

    Args:
        pipeline_dir: a folder written by ``LatentTextDiffusionPipeline.save_pretrained``.
        class_name: a class name or id (a string of digits is read as an id when it is not a
            class name); ``None`` samples unconditionally.
        guidance_scale: classifier-free guidance (1.0 = none).
        scheduler: ``ddpm | ddim | dpm++ | unipc | euler``, or ``None`` for the pipeline's own.
        seed: batch ``k`` uses ``torch.Generator().manual_seed(seed + k)``: the same call gives the same texts.
        batch_size: samples per pipeline call.
        pipe: an already loaded pipeline (then ``pipeline_dir`` is only reported).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    pipe = pipe if pipe is not None else load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    scheduler = make_scheduler(pipe, scheduler)
    label = class_name
    if isinstance(label, str) and label not in pipe.class_names and label.lstrip("-").isdigit():
        label = int(label)
    rows: list[dict[str, Any]] = []
    for batch, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        output = pipe(
            num_samples=n, class_labels=label, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed + batch),
            decode_kwargs=decode_kwargs, scheduler=scheduler,
        )
        name = pipe.class_names[label] if isinstance(label, int) else label
        rows.extend({"class": name, "text": text, "seed": seed + batch, "index": start + i}
                    for i, text in enumerate(output.texts))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows
