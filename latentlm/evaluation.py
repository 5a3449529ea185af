"""The LD4LG evaluation protocol: ``latentlm evaluate`` and ``latentlm evaluate-autoencoder``.

``evaluate`` samples ``num_samples`` texts from a pipeline for each seed and reports mean ± std
over seeds of MAUVE, perplexity, diversity, memorization and (for class-conditional models) class
accuracy, with the same metrics on human texts beside them, as JSON, a markdown table and an MLflow
run. ``evaluate_autoencoder`` reports reconstruction BLEU and exact match.

The judge models live in `latentlm.judges`, the file reader in `latentlm.data`, the sampling loop
in `latentlm.sampling` and the reconstruction scoring in `latentlm.reconstruction`; this module
puts them together and writes the results.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .data import find_label_column, read_texts
from .judges import FeatureModel, PerplexityModel, load_feature_model, load_perplexity_model
from .reconstruction import evaluate_reconstruction
from .sampling import load_pipeline, make_scheduler, sample_texts

logger = logging.getLogger(__name__)

METRIC_NAMES = ("mauve", "perplexity", "diversity", "memorization", "class_accuracy")
_METRIC_HEADERS = {
    "mauve": "MAUVE ↑",
    "perplexity": "Perplexity ↓",
    "diversity": "Diversity ↑",
    "memorization": "Memorization ↓",
    "class_accuracy": "Class accuracy ↑",
}

__all__ = ["METRIC_NAMES", "evaluate", "evaluate_autoencoder", "format_markdown"]


# ------------------------------------------------------------------------------------ inputs


def _load_pipeline(pipeline_or_dir, device):
    if isinstance(pipeline_or_dir, (str, Path)):
        return load_pipeline(pipeline_or_dir, device)
    if device is not None:
        pipeline_or_dir.to(device)
    return pipeline_or_dir


def _class_id(pipeline, class_name: str) -> int:
    names = list(pipeline.class_names)
    if not names:
        raise ValueError(f"class_name={class_name!r} was given but the pipeline's denoiser is unconditional.")
    if class_name not in names:
        raise ValueError(f"Unknown class {class_name!r}; the pipeline knows {names}.")
    return names.index(class_name)


@dataclass
class _Texts:
    """The human texts of one evaluation: references (MAUVE's p side) and training texts."""

    references: list[str]
    reference_labels: list[str] | None
    train: list[str] | None
    train_labels: list[str] | None
    human_pool: list[str] | None  # the human row's texts: training texts (of the class), if any


def _read_evaluation_texts(
    pipeline, references_file: Path, train_file, class_name, text_column, label_column
) -> _Texts:
    # Labels are needed only for class-conditional evaluation; find the column if not named.
    if class_name is not None and label_column is None:
        if train_file is None:
            raise ValueError(
                "class_name needs train_file (labelled training texts) to train the class-accuracy classifier."
            )
        label_column = find_label_column(Path(train_file), text_column, pipeline.class_names)
    ref_texts, ref_labels = read_texts(references_file, text_column)
    if class_name is not None:
        # Compare with the references of the requested class when the file is labelled.
        try:
            ref_texts, ref_labels = read_texts(references_file, text_column, label_column)
        except ValueError:
            logger.warning("%s has no column %r: MAUVE compares with all references.", references_file, label_column)
        else:
            ref_texts = [t for t, label in zip(ref_texts, ref_labels) if label == class_name]
            ref_labels = [class_name] * len(ref_texts)
            if len(ref_texts) < 2:
                raise ValueError(
                    f"{references_file} has fewer than 2 texts labelled {class_name!r} in {label_column!r}."
                )
    train_texts = train_labels = None
    if train_file is not None:
        train_texts, train_labels = read_texts(
            train_file, text_column, label_column if class_name is not None else None
        )
    human_pool = train_texts
    if class_name is not None and train_texts is not None:
        human_pool = [t for t, label in zip(train_texts, train_labels) if label == class_name]
    return _Texts(ref_texts, ref_labels, train_texts, train_labels, human_pool)


@dataclass
class _Judges:
    features: FeatureModel | None
    perplexity: PerplexityModel | None
    classifier: Any = None
    class_name: str | None = None


def _load_judges(
    feature_model, perplexity_model, texts: _Texts, class_name, max_classifier_examples, device
) -> _Judges:
    """Judge names -> models (``None`` / ``"none"``: skip), and the class-accuracy classifier."""
    if isinstance(feature_model, str) and feature_model.lower() == "none":
        feature_model = None
    if isinstance(perplexity_model, str) and perplexity_model.lower() == "none":
        perplexity_model = None
    if isinstance(feature_model, str):
        feature_model = load_feature_model(feature_model, device=device)
    if isinstance(perplexity_model, str):
        perplexity_model = load_perplexity_model(perplexity_model, device=device)
    judges = _Judges(feature_model, perplexity_model, class_name=class_name)
    if class_name is not None:
        if feature_model is None:
            raise ValueError("class accuracy needs a feature model; pass feature_model.")
        indices = list(range(len(texts.train)))
        random.Random(0).shuffle(indices)
        indices = indices[:max_classifier_examples]
        judges.classifier = metrics.train_text_classifier(
            feature_model([texts.train[i] for i in indices]), [texts.train_labels[i] for i in indices]
        )
    return judges


def _seed_splits(seeds: Sequence[int], texts: _Texts, num_samples: int) -> dict[int, tuple[list[int], list[str]]]:
    """Per seed: MAUVE's human side (indices into the references) and the human row's texts."""
    splits = {}
    for seed in seeds:
        rng = random.Random(seed)
        order = list(range(len(texts.references)))
        rng.shuffle(order)
        if texts.human_pool:
            splits[seed] = (order[:num_samples], rng.sample(texts.human_pool, min(num_samples, len(texts.human_pool))))
        else:
            half = min(num_samples, len(order) // 2)
            splits[seed] = (order[:half], [texts.references[i] for i in order[half : 2 * half]])
    return splits


def _reference_features(judges: _Judges, texts: _Texts, splits) -> torch.Tensor | None:
    """Features of the references some seed uses (a reference file can be much larger than num_samples)."""
    if judges.features is None:
        return None
    used = sorted({i for p_idx, _ in splits.values() for i in p_idx})
    embedded = judges.features([texts.references[i] for i in used])
    features = torch.zeros(len(texts.references), embedded.shape[1])
    features[used] = embedded
    return features


# ------------------------------------------------------------------------------------ evaluate


def _score_row(
    row: str, q_texts: list[str], p_idx: list[int], seed: int, texts: _Texts, judges: _Judges, ref_features
) -> dict[str, float | None]:
    """One row's metrics for one seed: ``row`` is ``"model"`` (samples) or ``"references"`` (human)."""
    values: dict[str, float | None] = {}
    q_features = None
    if judges.features is not None:
        q_features = judges.features(q_texts)
        values["mauve"] = (
            metrics.mauve_score(ref_features[p_idx], q_features, seed=seed)
            if len(p_idx) >= 2 and len(q_texts) >= 2
            else None
        )
    if judges.perplexity is not None:
        scores = [v for v in judges.perplexity.per_text(q_texts) if v == v]  # v != v: nan, empty text
        if not scores:
            logger.warning("seed %d: every %s text is empty; perplexity left out.", seed, row)
        values["perplexity"] = sum(scores) / len(scores) if scores else None
    values["diversity"] = metrics.diversity(q_texts)
    if texts.train is not None:
        # The human row's memorization is the references' natural overlap with the training set.
        mem_texts = q_texts if row == "model" else [texts.references[i] for i in p_idx]
        values["memorization"] = metrics.memorization(mem_texts, texts.train)
    if judges.classifier is not None:
        if row == "model":
            values["class_accuracy"] = metrics.class_accuracy(judges.classifier, q_features, judges.class_name)
        elif texts.reference_labels:
            values["class_accuracy"] = metrics.class_accuracy(judges.classifier, ref_features[p_idx], judges.class_name)
        else:
            values["class_accuracy"] = None
    return values


def _sample_and_score(
    pipeline, seeds, splits, texts: _Texts, judges: _Judges, ref_features, *, num_samples: int, **sampling
) -> tuple[dict[str, dict[str, list]], dict[int, list[str]], list[float]]:
    """Per seed: sample ``num_samples`` texts (seeded with the seed) and score both rows.

    Returns ``(rows, samples, timings)``: ``rows[row][metric]`` holds one value per seed,
    ``samples[seed]`` the texts and ``timings`` the sampling seconds of each seed."""
    rows: dict[str, dict[str, list[float | None]]] = {"model": {}, "references": {}}
    samples: dict[int, list[str]] = {}
    timings = []
    for seed in seeds:
        p_idx, human = splits[seed]
        start = time.perf_counter()
        samples[seed] = [row["text"] for row in sample_texts(pipeline, num_samples, seed=seed, **sampling)]
        timings.append(time.perf_counter() - start)
        logger.info("seed %d: sampled %d texts in %.1f s", seed, len(samples[seed]), timings[-1])
        for row, q_texts in (("model", samples[seed]), ("references", human)):
            for name, value in _score_row(row, q_texts, p_idx, seed, texts, judges, ref_features).items():
                rows[row].setdefault(name, []).append(value)
    return rows, samples, timings


def evaluate(
    pipeline_dir,
    references_file: str | Path,
    train_file: str | Path | None = None,
    class_name: str | None = None,
    num_samples: int = 1000,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    *,
    output_dir: str | Path | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    num_inference_steps: int | None = None,
    scheduler: str | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    decode_kwargs: dict | None = None,
    feature_model: str | FeatureModel | None = "auto",
    perplexity_model: str | PerplexityModel | None = "auto",
    max_classifier_examples: int = 5000,
    tracking=None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run the LD4LG evaluation of a pipeline; returns (and writes) the results.

    Args:
        pipeline_dir: a ``LatentTextDiffusionPipeline`` folder (or an already loaded pipeline, which
            is left unchanged: the scheduler is passed per call).
        references_file: human texts (jsonl/json/csv/parquet/txt); MAUVE compares samples with them.
        train_file: training texts, for memorization, the class-accuracy classifier and the human row.
        class_name: sample with this class (class-conditional pipelines) and report class accuracy.
        num_samples, seeds: ``num_samples`` texts are sampled for each seed (`sampling.sample_texts`);
            metrics are mean ± std.
        output_dir: where ``results.json``, ``results.md`` and ``samples.jsonl`` go
            (default ``<pipeline_dir>/evaluation``; nothing is written for a pipeline object without it).
        num_inference_steps: ``None``: the pipeline's default.
        scheduler: a name from `sampling.SCHEDULERS`; ``None``: the pipeline's own.
        feature_model, perplexity_model: judge names (see `latentlm.judges`), loaded models, or ``None`` to skip.
        tracking: a ``TrackingConfig``; ``None`` uses the default one (``MLFLOW_TRACKING_URI`` or MLflow's
            local default store); ``TrackingConfig(enabled=False)`` logs nothing.

    The human ("references") row: per seed, references are shuffled and ``num_samples`` of them form
    MAUVE's p side for both rows. The human q side is ``num_samples`` training texts when
    ``train_file`` is given (else the other half of the references). Its memorization is that of the
    references against the training set (the natural overlap), its class accuracy that of the
    classifier on references labelled with ``class_name``.

    Returns a dict with ``model`` and ``references`` rows (``{metric: {mean, std, per_seed}}`` or
    ``None`` where not computed), the settings, ``samples`` (``{seed: texts}``) and ``markdown``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (MAUVE compares distributions), got {num_samples}.")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed.")
    references_file = Path(references_file)
    pipeline = _load_pipeline(pipeline_dir, device)
    scheduler = make_scheduler(pipeline, scheduler)
    class_id = _class_id(pipeline, class_name) if class_name is not None else None
    texts = _read_evaluation_texts(pipeline, references_file, train_file, class_name, text_column, label_column)
    judges = _load_judges(feature_model, perplexity_model, texts, class_name, max_classifier_examples, device)
    splits = _seed_splits(seeds, texts, num_samples)
    ref_features = _reference_features(judges, texts, splits)

    rows, samples, timings = _sample_and_score(
        pipeline,
        seeds,
        splits,
        texts,
        judges,
        ref_features,
        num_samples=num_samples,
        class_name=class_id,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        scheduler=scheduler,
        batch_size=batch_size,
        decode_kwargs=decode_kwargs,
    )
    result = _result(
        pipeline_dir,
        references_file,
        train_file,
        class_name,
        num_samples,
        seeds,
        num_inference_steps,
        scheduler,
        guidance_scale,
        judges,
        rows,
        timings,
    )
    result["markdown"] = format_markdown(result)

    if output_dir is None and isinstance(pipeline_dir, (str, Path)):
        output_dir = Path(pipeline_dir) / "evaluation"
    if output_dir is not None:
        _write_results(Path(output_dir), result, samples)
    _log_to_mlflow(result, samples, tracking, output_dir)
    result["samples"] = samples
    return result


# ------------------------------------------------------------------------------------ results


def _result(
    pipeline_dir,
    references_file,
    train_file,
    class_name,
    num_samples,
    seeds,
    num_inference_steps,
    scheduler,
    guidance_scale,
    judges: _Judges,
    rows,
    timings,
) -> dict[str, Any]:
    """The settings of an evaluation and its ``model`` / ``references`` rows as mean ± std over seeds."""
    result: dict[str, Any] = {
        "pipeline": str(pipeline_dir) if isinstance(pipeline_dir, (str, Path)) else type(pipeline_dir).__name__,
        "references_file": str(references_file),
        "train_file": str(train_file) if train_file is not None else None,
        "class_name": class_name,
        "num_samples": num_samples,
        "seeds": seeds,
        "num_inference_steps": num_inference_steps,
        "scheduler": type(scheduler).__name__,
        "guidance_scale": guidance_scale,
        "feature_model": judges.features.name if judges.features is not None else None,
        "perplexity_model": judges.perplexity.name if judges.perplexity is not None else None,
        "sampling_seconds": _summary(timings),
        "texts_per_second": num_samples * len(seeds) / sum(timings),
    }
    for row, values in rows.items():
        result[row] = {m: _summary(values[m]) if m in values else None for m in METRIC_NAMES}
    return result


def _summary(per_seed: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in per_seed if v is not None]
    if not values:
        return None
    stats = metrics.mean_std(values)
    return {"mean": stats.mean, "std": stats.std, "per_seed": values}


def format_markdown(result: dict[str, Any]) -> str:
    """The ``model`` / ``references`` rows of an ``evaluate`` result as a markdown table."""
    rows = {name: result[name] for name in ("model", "references") if name in result}
    names = [m for m in METRIC_NAMES if any(r.get(m) is not None for r in rows.values())]
    lines = ["| | " + " | ".join(_METRIC_HEADERS[m] for m in names) + " |", "|---|" + "---|" * len(names)]
    for row_name, row in rows.items():
        cells = []
        for m in names:
            entry = row.get(m)
            if entry is None:
                cells.append("–")
            elif m != "perplexity" and 0 < abs(entry["mean"]) < 0.01:
                # Tiny values (diversity of a small grammar) would print as 0.000.
                cells.append(f"{entry['mean']:.2e} ± {entry['std']:.1e}")
            else:
                digits = 1 if m == "perplexity" else 3
                cells.append(f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}")
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    seeds = result.get("seeds", [])
    lines.append("")
    notes = [f"{result.get('num_samples')} samples × {len(seeds)} seeds"]
    if result.get("feature_model"):
        notes.append(f"MAUVE features: {result['feature_model']}")
    if result.get("perplexity_model"):
        notes.append(f"perplexity judge: {result['perplexity_model']}")
    lines.append("; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


def _write_results(folder: Path, result: dict[str, Any], samples: dict[int, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (folder / "results.md").write_text(result["markdown"])
    with open(folder / "samples.jsonl", "w") as handle:
        for seed, texts in samples.items():
            for text in texts:
                handle.write(json.dumps({"seed": seed, "text": text}, ensure_ascii=False) + "\n")


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for row in ("model", "references"):
        for name, entry in result.get(row, {}).items():
            if entry is not None:
                flat[f"{row}/{name}_mean"] = entry["mean"]
                flat[f"{row}/{name}_std"] = entry["std"]
    return flat


def _log_to_mlflow(result: dict[str, Any], samples: dict[int, list[str]], tracking, output_dir) -> None:
    from .config import TrackingConfig
    from .tracking import Tracker

    cfg = tracking if tracking is not None else TrackingConfig()
    if not cfg.enabled:
        return
    params = {
        k: result[k]
        for k in (
            "pipeline",
            "references_file",
            "train_file",
            "class_name",
            "num_samples",
            "seeds",
            "num_inference_steps",
            "scheduler",
            "guidance_scale",
            "feature_model",
            "perplexity_model",
        )
    }
    with Tracker(cfg, run_name=cfg.run_name or "evaluate", fallback_dir=output_dir) as tracker:
        tracker.log_params({"evaluate": params})
        tracker.log_metrics(_flat_metrics(result) | {"texts_per_second": result["texts_per_second"]}, step=0)
        for i, seed in enumerate(result["seeds"]):
            per_seed = {
                f"{row}/{name}": entry["per_seed"][i]
                for row in ("model", "references")
                for name, entry in result[row].items()
                if entry is not None and i < len(entry["per_seed"])
            }
            tracker.log_metrics(per_seed, step=seed)
        tracker.log_table([{"seed": s, "text": t} for s, texts in samples.items() for t in texts], "samples.json")
        tracker.log_dict({k: v for k, v in result.items() if k != "markdown"}, "results.json")
        tracker.log_text(result["markdown"], "results.md")


# ------------------------------------------------------------------------------------ autoencoder


def _load_codec(model_or_dir, device):
    """A pipeline or a TextAutoencoder (from a folder or as given): anything with encode/decode."""
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        if (folder / "model_index.json").is_file():
            return _load_pipeline(folder, device)
        from .autoencoder.text_autoencoder import TextAutoencoder

        model = TextAutoencoder.from_pretrained(str(folder))
        if device is not None:
            model.to(device)
        return model.eval()
    return model_or_dir


def _autoencoder_markdown(result: dict[str, Any]) -> str:
    return (
        "| | BLEU ↑ | Exact match ↑ |\n|---|---|---|\n"
        f"| reconstruction (vs tokenized text) | {result['bleu']:.2f} | {result['exact_match']:.3f} |\n"
        f"| reconstruction (vs raw text) | {result['bleu_raw_text']:.2f} | {result['exact_match_raw_text']:.3f} |\n"
    )


def evaluate_autoencoder(
    model_dir,
    references_file: str | Path,
    num_samples: int = 1000,
    *,
    text_column: str = "text",
    batch_size: int = 32,
    decode_kwargs: dict | None = None,
    output_dir: str | Path | None = None,
    tracking=None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Reconstruction BLEU (sacrebleu, 0-100) and exact match of the first ``num_samples`` references,
    against the texts as the tokenizer represents them (``bleu``, ``exact_match``) and as written
    (``bleu_raw_text``, ``exact_match_raw_text``); scored by `reconstruction.evaluate_reconstruction`.

    ``model_dir`` is a ``TextAutoencoder`` folder, a pipeline folder, or a loaded model with
    ``encode(texts) -> [B, N, D]`` and ``decode(latents, **kw) -> list[str]``. ``decode_kwargs``
    override the model's own decoding defaults (``None``: the defaults).
    """
    codec = _load_codec(model_dir, device)
    texts, _ = read_texts(references_file, text_column)
    texts = texts[:num_samples]
    start = time.perf_counter()
    scores = evaluate_reconstruction(
        codec, texts, batch_size=batch_size, generate_kwargs=dict(decode_kwargs or {}), num_examples=len(texts)
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": str(model_dir) if isinstance(model_dir, (str, Path)) else type(model_dir).__name__,
        "references_file": str(references_file),
        "num_samples": scores["num_samples"],
        **{k: scores[k] for k in ("bleu", "exact_match", "bleu_raw_text", "exact_match_raw_text")},
        "texts_per_second": len(texts) / seconds,
    }
    result["markdown"] = _autoencoder_markdown(result)
    examples = scores["examples"]
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "autoencoder_results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (folder / "autoencoder_results.md").write_text(result["markdown"])
    _log_autoencoder_to_mlflow(result, examples, tracking, output_dir)
    result["examples"] = examples
    return result


def _log_autoencoder_to_mlflow(result: dict[str, Any], examples: list[dict], tracking, output_dir) -> None:
    from .config import TrackingConfig
    from .tracking import Tracker

    cfg = tracking if tracking is not None else TrackingConfig()
    if not cfg.enabled:
        return
    with Tracker(cfg, run_name=cfg.run_name or "evaluate-autoencoder", fallback_dir=output_dir) as tracker:
        tracker.log_params(
            {"evaluate_autoencoder": {k: result[k] for k in ("model", "references_file", "num_samples")}}
        )
        tracker.log_metrics(
            {k: result[k] for k in ("bleu", "exact_match", "bleu_raw_text", "exact_match_raw_text")}, step=0
        )
        tracker.log_table(examples, "reconstructions.json")
