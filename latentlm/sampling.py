"""Sampling texts from a pipeline: `sample_texts` (the one sampling loop) and `sample` (``latentlm sample``)."""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import torch

__all__ = ["SCHEDULERS", "make_scheduler", "load_pipeline", "sample_texts", "sample_per_class", "sample"]

#: Scheduler names accepted by ``--scheduler`` -> (diffusers class name, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(pipe, name):
    """The scheduler to pass to one call as ``pipe(..., scheduler=...)``: ``None`` gives the pipeline's
    own, a name from `SCHEDULERS` a new one built from the pipeline's scheduler config, and a
    scheduler instance is returned as it is. The pipeline is not changed."""
    if name is None:
        return pipe.scheduler
    if not isinstance(name, str):
        return name
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)


def load_pipeline(pipeline_dir: str | Path, device: str | torch.device | None = None):
    """`LatentTextDiffusionPipeline.from_pretrained`, optionally moved to ``device``."""
    from latentlm.pipelines import LatentTextDiffusionPipeline

    pipe = LatentTextDiffusionPipeline.from_pretrained(pipeline_dir)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _check_counts(num_samples, batch_size) -> None:
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _class_label(pipe, class_name):
    """A digit string that is not a class name (or a numpy integer) is read as a class id."""
    if isinstance(class_name, str) and class_name not in pipe.class_names and class_name.lstrip("-").isdigit():
        return int(class_name)
    if isinstance(class_name, numbers.Integral) and not isinstance(class_name, bool):
        return int(class_name)
    return class_name


def sample_texts(
    pipe,
    num_samples: int,
    *,
    class_name=None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    num_inference_steps: int = 50,
    scheduler=None,
    seed: int = 0,
    batch_size: int = 64,
    decode_kwargs: dict | None = None,
    controls: dict[str, Any] | None = None,
    control_scale: float | dict[str, float] = 1.0,
    source_texts: list[str] | None = None,
    mbr_candidates: int = 1,
    mbr_metric: str = "bleu",
) -> list[dict]:
    """rows [{"class", "text", "seed", "index"}]; batch k uses torch.Generator().manual_seed(seed + k);
    source_texts: text-to-text pipelines: ``num_samples`` texts for each source, rows gain ``"source"``
    (``index`` counts the samples of one source); mbr_candidates / mbr_metric: MBR decoding, as in the
    pipeline's ``__call__``;
    guidance_interval: the noise levels ``t / T`` that guidance applies to, as in the pipeline's ``__call__``;
    controls / control_scale: classifier guidance, as in the pipeline's ``__call__`` (one target per control);
    scheduler: None (pipeline's own), a name from SCHEDULERS, or a scheduler instance (used for this call only via pipe(..., scheduler=...));
    class_name: None (unconditional), a class name, an int id, or a digit string that is not a class name.

    The pipeline is left as it is (its scheduler and progress-bar settings included), so one
    pipeline can serve concurrent calls. ``num_inference_steps=None`` uses the pipeline's default.
    """
    _check_counts(num_samples, batch_size)
    scheduler = make_scheduler(pipe, scheduler)
    label = _class_label(pipe, class_name)
    call_kwargs: dict[str, Any] = {
        "class_labels": label,
        "guidance_scale": guidance_scale,
        "guidance_interval": guidance_interval,
        "decode_kwargs": decode_kwargs,
        "scheduler": scheduler,
    }
    if controls:
        call_kwargs.update(controls=controls, control_scale=control_scale)
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    if mbr_candidates != 1:
        call_kwargs.update(mbr_candidates=mbr_candidates, mbr_metric=mbr_metric)
    rows: list[dict[str, Any]] = []
    if source_texts is not None:
        if isinstance(source_texts, str):
            source_texts = [source_texts]
        sources = list(source_texts)
        per_call = max(1, batch_size // (num_samples * mbr_candidates))
        for batch, start in enumerate(range(0, len(sources), per_call)):
            chunk = sources[start : start + per_call]
            output = pipe(
                source_texts=chunk,
                num_samples_per_source=num_samples,
                generator=torch.Generator().manual_seed(seed + batch),
                **call_kwargs,
            )
            name = pipe.class_names[label] if isinstance(label, int) else label
            for source, texts in zip(chunk, output.texts):
                rows.extend(
                    {"class": name, "source": source, "text": text, "seed": seed + batch, "index": i}
                    for i, text in enumerate(texts)
                )
        return rows
    for batch, start in enumerate(range(0, num_samples, batch_size)):
        output = pipe(
            num_samples=min(batch_size, num_samples - start),
            generator=torch.Generator().manual_seed(seed + batch),
            **call_kwargs,
        )
        name = pipe.class_names[label] if isinstance(label, int) else label  # the pipeline checked the id
        rows.extend(
            {"class": name, "text": text, "seed": seed + batch, "index": start + i}
            for i, text in enumerate(output.texts)
        )
    return rows


def sample_per_class(
    pipe,
    num_per_class: int,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    scheduler=None,
    seed: int = 0,
    source_texts: list[str] | None = None,
) -> list[dict[str, Any]]:
    """``num_per_class`` samples ``{"class", "text"}`` for every class (or unconditional ones); a text-to-text
    pipeline writes one text ``{"class", "source", "text"}`` for each of ``source_texts`` instead (per class,
    if it has classes). ``guidance_scale`` applies where there is a class or a source to guide on."""
    rows: list[dict[str, Any]] = []
    for name in pipe.class_names or [None]:
        guided = name is not None or source_texts is not None
        rows.extend(
            {"class": row["class"], **({"source": row["source"]} if source_texts else {}), "text": row["text"]}
            for row in sample_texts(
                pipe,
                1 if source_texts else num_per_class,
                class_name=name,
                guidance_scale=guidance_scale if guided else 1.0,
                num_inference_steps=num_inference_steps,
                scheduler=scheduler,
                seed=seed,
                source_texts=source_texts,
            )
        )
    return rows


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
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 64,
    decode_kwargs: dict[str, Any] | None = None,
    pipe=None,
    controls: dict[str, Any] | None = None,
    control_scale: float | dict[str, float] = 1.0,
    source_texts: list[str] | None = None,
    mbr_candidates: int = 1,
    mbr_metric: str = "bleu",
) -> list[dict[str, Any]]:
    """Sample ``num_samples`` texts (per source, with ``source_texts``); returns
    ``[{"class", "text", "seed", "index"}]`` (rows gain ``"source"``) and writes jsonl to ``out``.

    Args:
        pipeline_dir: a folder written by ``LatentTextDiffusionPipeline.save_pretrained``.
        class_name: a class name or id (a string of digits is read as an id when it is not a
            class name); ``None`` samples unconditionally.
        guidance_scale: classifier-free guidance (1.0 = none).
        guidance_interval: ``(low, high)``: guide only at noise levels ``t / T`` in this range.
        scheduler: ``ddpm | ddim | dpm++ | unipc | euler``, or ``None`` for the pipeline's own.
        seed: batch ``k`` uses ``torch.Generator().manual_seed(seed + k)``: the same call gives the same texts.
        batch_size: samples per pipeline call.
        pipe: an already loaded pipeline (then ``pipeline_dir`` is only reported).
        controls, control_scale: classifier guidance by the pipeline's classifiers, e.g.
            ``{"price": "cheap"}`` (see the pipeline's ``__call__``).
        source_texts, mbr_candidates, mbr_metric: text-to-text pipelines, as in `sample_texts`.

    See `sample_texts`, which does the sampling; this loads the pipeline (progress bar off) and writes the file.
    """
    _check_counts(num_samples, batch_size)  # before loading the pipeline
    pipe = pipe if pipe is not None else load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    rows = sample_texts(
        pipe,
        num_samples,
        class_name=class_name,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        num_inference_steps=num_inference_steps,
        scheduler=scheduler,
        seed=seed,
        batch_size=batch_size,
        decode_kwargs=decode_kwargs,
        controls=controls,
        control_scale=control_scale,
        source_texts=source_texts,
        mbr_candidates=mbr_candidates,
        mbr_metric=mbr_metric,
    )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows
