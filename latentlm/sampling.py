"""Sampling texts from a pipeline: `sample_texts` (the one sampling loop) and `sample` (``latentlm sample``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from latentlm.pipelines.conditioning import class_label_id
from latentlm.pipelines.sampling_options import SamplingOptions, make_scheduler

__all__ = ["LANGUAGE_MODEL_DTYPES", "load_pipeline", "sample_texts", "sample_long_texts", "sample_per_class", "sample"]


#: ``language_model_dtype`` values of `load_pipeline`
LANGUAGE_MODEL_DTYPES = ("float32", "bfloat16", "auto")


def load_pipeline(
    pipeline_dir: str | Path, device: str | torch.device | None = None, language_model_dtype: str = "float32"
):
    """`LatentTextDiffusionPipeline.from_pretrained`, optionally moved to ``device``.

    ``language_model_dtype``: the precision the language model decodes in: ``"float32"`` (as saved),
    ``"bfloat16"``, or ``"auto"`` (bf16 where the device multiplies it natively, `latentlm.hardware`;
    decoding is most of a sample's time). The other components stay as saved.
    """
    from latentlm.hardware import has_native_bf16
    from latentlm.pipelines import LatentTextDiffusionPipeline

    if language_model_dtype not in LANGUAGE_MODEL_DTYPES:
        raise ValueError(f"language_model_dtype={language_model_dtype!r}: use one of {LANGUAGE_MODEL_DTYPES}.")
    pipe = LatentTextDiffusionPipeline.from_pretrained(pipeline_dir)
    if device is not None:
        pipe = pipe.to(device)
    if language_model_dtype == "auto":
        language_model_dtype = "bfloat16" if has_native_bf16(pipe.device) else "float32"
    pipe.language_model.to(getattr(torch, language_model_dtype))
    return pipe


def _check_counts(num_samples, batch_size) -> None:
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def sample_texts(
    pipe,
    num_samples: int,
    *,
    class_name=None,
    seed: int = 0,
    batch_size: int = 64,
    controls: dict[str, Any] | None = None,
    source_texts: list[str] | None = None,
    options: SamplingOptions | None = None,
    **option_changes,
) -> list[dict]:
    """rows [{"class", "text", "seed", "index"}]; batch k uses torch.Generator().manual_seed(seed + k).

    Args:
        class_name: None (unconditional), a class name, an int id, or a digit string that is not a class name.
        controls: classifier guidance, as in the pipeline's ``__call__`` (one target per control).
        source_texts: text-to-text pipelines: ``num_samples`` texts for each source; rows gain ``"source"``
            (``index`` counts the samples of one source).
        options, option_changes: how to sample (`SamplingOptions`, and any of its fields as a keyword).

    The pipeline is left as it is (its scheduler and progress-bar settings included), so one
    pipeline can serve concurrent calls.
    """
    _check_counts(num_samples, batch_size)
    options = SamplingOptions.of(options, **option_changes)
    # the scheduler is built once for every batch of this call (each batch steps its own copy)
    options = options.replace(scheduler=make_scheduler(pipe.scheduler, options.scheduler))
    name = None if class_name is None else pipe.class_names[class_label_id(pipe.class_names, class_name)]
    call_kwargs: dict[str, Any] = {"class_labels": name, "options": options, "controls": controls or None}
    rows: list[dict[str, Any]] = []
    if source_texts is not None:
        if isinstance(source_texts, str):
            source_texts = [source_texts]
        sources = list(source_texts)
        per_call = max(1, batch_size // (num_samples * options.mbr_candidates))
        for batch, start in enumerate(range(0, len(sources), per_call)):
            chunk = sources[start : start + per_call]
            output = pipe(
                source_texts=chunk,
                num_samples_per_source=num_samples,
                generator=torch.Generator().manual_seed(seed + batch),
                **call_kwargs,
            )
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
        rows.extend(
            {"class": name, "text": text, "seed": seed + batch, "index": start + i}
            for i, text in enumerate(output.texts)
        )
    return rows


def sample_long_texts(
    pipe,
    num_samples: int | None = None,
    *,
    num_segments: int | None = None,
    prompt_texts: list[str] | None = None,
    infill: list[tuple[str, str]] | None = None,
    class_name=None,
    seed: int = 0,
    options: SamplingOptions | None = None,
) -> list[dict]:
    """Long texts of a pipeline trained on segments (see its ``write_long_text``): rows
    ``{"class", "text", "segments", "seed", "index"}`` (with ``"prompt"`` or ``"left"`` / ``"right"``)."""
    name = None if class_name is None else pipe.class_names[class_label_id(pipe.class_names, class_name)]
    output = pipe(
        num_samples=num_samples,
        class_labels=name,
        num_segments=num_segments,
        prompt_texts=prompt_texts,
        infill=infill,
        generator=torch.Generator().manual_seed(seed),
        options=options,
    )
    rows = []
    for index, (text, segments) in enumerate(zip(output.texts, output.segments)):
        row = {"class": name, "text": text, "segments": segments, "seed": seed, "index": index}
        if prompt_texts is not None:
            row["prompt"] = prompt_texts[index]
        if infill is not None:
            row["left"], row["right"] = infill[index]
        rows.append(row)
    return rows


def sample_per_class(
    pipe,
    num_per_class: int,
    *,
    seed: int = 0,
    source_texts: list[str] | None = None,
    options: SamplingOptions | None = None,
    **option_changes,
) -> list[dict[str, Any]]:
    """``num_per_class`` samples ``{"class", "text"}`` for every class (or unconditional ones); a text-to-text
    pipeline writes one text ``{"class", "source", "text"}`` for each of ``source_texts`` instead (per class,
    if it has classes). Guidance applies where there is a class or a source to guide on."""
    options = SamplingOptions.of(options, **option_changes)
    rows: list[dict[str, Any]] = []
    for name in pipe.class_names or [None]:
        guided = name is not None or source_texts is not None
        rows.extend(
            {"class": row["class"], **({"source": row["source"]} if source_texts else {}), "text": row["text"]}
            for row in sample_texts(
                pipe,
                1 if source_texts else num_per_class,
                class_name=name,
                seed=seed,
                source_texts=source_texts,
                options=options if guided else options.replace(guidance_scale=1.0),
            )
        )
    return rows


def sample(
    pipeline_dir: str | Path,
    class_name: str | int | None = None,
    num_samples: int = 16,
    seed: int = 0,
    out: str | Path | None = None,
    *,
    batch_size: int = 64,
    pipe=None,
    controls: dict[str, Any] | None = None,
    source_texts: list[str] | None = None,
    language_model_dtype: str = "float32",
    long_text: dict[str, Any] | None = None,
    options: SamplingOptions | None = None,
    **option_changes,
) -> list[dict[str, Any]]:
    """Sample ``num_samples`` texts (per source, with ``source_texts``); returns
    ``[{"class", "text", "seed", "index"}]`` (rows gain ``"source"``) and writes jsonl to ``out``.

    Args:
        pipeline_dir: a folder written by ``LatentTextDiffusionPipeline.save_pretrained``.
        class_name: a class name or id (a string of digits is read as an id when it is not a
            class name); ``None`` samples unconditionally.
        seed: batch ``k`` uses ``torch.Generator().manual_seed(seed + k)``: the same call gives the same texts.
        batch_size: samples per pipeline call.
        pipe: an already loaded pipeline (then ``pipeline_dir`` is only reported).
        controls: classifier guidance by the pipeline's classifiers, e.g. ``{"price": "cheap"}``.
        source_texts: text-to-text pipelines, as in `sample_texts`.
        language_model_dtype: the language model's precision, as in `load_pipeline`.
        long_text: ``{"num_segments", "prompt_texts", "infill"}`` for a pipeline trained on segments
            (`sample_long_texts`; rows gain ``"segments"``).
        options, option_changes: how to sample (`SamplingOptions`, and any of its fields as a keyword).

    See `sample_texts`, which does the sampling; this loads the pipeline (progress bar off) and writes the file.
    """
    _check_counts(num_samples, batch_size)  # before loading the pipeline
    options = SamplingOptions.of(options, **option_changes)
    pipe = pipe if pipe is not None else load_pipeline(pipeline_dir, language_model_dtype=language_model_dtype)
    pipe.set_progress_bar_config(disable=True)
    if long_text:
        given = long_text.get("prompt_texts") or long_text.get("infill")  # one text per prompt or gap
        rows = sample_long_texts(
            pipe, None if given else num_samples, class_name=class_name, seed=seed, options=options, **long_text
        )
    else:
        rows = sample_texts(
            pipe,
            num_samples,
            class_name=class_name,
            seed=seed,
            batch_size=batch_size,
            controls=controls,
            source_texts=source_texts,
            options=options,
        )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows
