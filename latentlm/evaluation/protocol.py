"""The LD4LG evaluation protocol: ``latentlm evaluate`` and ``latentlm evaluate-autoencoder``.

``evaluate`` samples ``num_samples`` texts from a pipeline for each seed and reports mean ± std
over seeds of MAUVE, perplexity, diversity, memorization and (for class-conditional models) class
accuracy, with the same metrics on human texts beside them, as JSON, a markdown table and an MLflow
run. The human ("references") row: per seed, references are shuffled and ``num_samples`` of them
form MAUVE's p side for both rows; the human q side is ``num_samples`` training texts when
``train_file`` is given (else the other half of the references). Its memorization is that of the
references against the training set (the natural overlap), its class accuracy that of the
classifier on references labelled with ``class_name``.

``evaluate_autoencoder`` (in `latentlm.evaluation.reconstruction`, re-exported here) reports
reconstruction BLEU and exact match.

The judge models live in `latentlm.evaluation.judges`, the file reader in `latentlm.data.loading`, the sampling loop
in `latentlm.sampling` and the reconstruction scoring in `latentlm.evaluation.reconstruction`; this module
puts them together and writes the results.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentlm.data.loading import find_label_column, read_texts
from latentlm.evaluation import metrics
from latentlm.evaluation.judges import (
    TOPIC_JUDGE_MODEL,
    FeatureModel,
    PerplexityModel,
    load_feature_model,
    load_perplexity_model,
)
from latentlm.evaluation.reconstruction import evaluate_autoencoder
from latentlm.evaluation.report import METRIC_NAMES, build_result, format_markdown, log_to_mlflow, write_results
from latentlm.pipelines.conditioning import class_label_id
from latentlm.pipelines.sampling_options import SamplingOptions, make_scheduler
from latentlm.sampling import load_pipeline, sample_texts

logger = logging.getLogger(__name__)


__all__ = ["METRIC_NAMES", "evaluate", "evaluate_autoencoder", "format_markdown"]


# ------------------------------------------------------------------------------------ inputs


def _load_pipeline(pipeline_or_dir, device):
    if isinstance(pipeline_or_dir, (str, Path)):
        return load_pipeline(pipeline_or_dir, device)
    if device is not None:
        pipeline_or_dir.to(device)
    return pipeline_or_dir


def _class_id(pipeline, class_name: str) -> int:
    try:
        return class_label_id(pipeline.class_names, class_name)
    except ValueError as err:
        raise ValueError(f"Unknown class {class_name!r} to evaluate: {err}") from err


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
    topic: FeatureModel | None = None
    classifier: Any = None
    class_name: str | None = None

    @property
    def names(self) -> tuple[str | None, str | None, str | None]:
        """The names of the feature, perplexity and topic models (``None`` where skipped)."""
        return tuple(getattr(judge, "name", None) for judge in (self.features, self.perplexity, self.topic))

    @property
    def classifier_key(self) -> str:
        """Which judge's features the class-accuracy probe reads: the topic judge, or without one the MAUVE judge."""
        return "topic" if self.topic is not None else "features"

    @property
    def classifier_features(self) -> FeatureModel | None:
        return getattr(self, self.classifier_key)


def _load_judge(judge, loader, device):
    """A judge name -> its model (``None`` / ``"none"``: skipped); a loaded model is kept."""
    if judge is None or (isinstance(judge, str) and judge.lower() == "none"):
        return None
    return loader(judge, device=device) if isinstance(judge, str) else judge


def _load_judges(
    feature_model, perplexity_model, topic_model, texts: _Texts, class_name, max_classifier_examples, device
) -> _Judges:
    """Judge names -> models, and the class-accuracy classifier."""
    judges = _Judges(
        _load_judge(feature_model, load_feature_model, device),
        _load_judge(perplexity_model, load_perplexity_model, device),
        _load_judge(topic_model, load_feature_model, device),
        class_name=class_name,
    )
    if class_name is not None:
        if judges.classifier_features is None:
            raise ValueError("class accuracy needs a feature model; pass topic_model or feature_model.")
        indices = list(range(len(texts.train)))
        random.Random(0).shuffle(indices)
        indices = indices[:max_classifier_examples]
        judges.classifier = metrics.train_text_classifier(
            judges.classifier_features([texts.train[i] for i in indices]), [texts.train_labels[i] for i in indices]
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


def _reference_features(model: FeatureModel | None, texts: _Texts, splits) -> torch.Tensor | None:
    """Features of the references some seed uses (a reference file can be much larger than num_samples)."""
    if model is None:
        return None
    used = sorted({i for p_idx, _ in splits.values() for i in p_idx})
    embedded = model([texts.references[i] for i in used])
    features = torch.zeros(len(texts.references), embedded.shape[1])
    features[used] = embedded
    return features


# ------------------------------------------------------------------------------------ evaluate


def _mauve(ref_features, p_idx: list[int], q_features, seed: int) -> float | None:
    if len(p_idx) < 2 or len(q_features) < 2:
        return None
    return metrics.mauve_score(ref_features[p_idx], q_features, seed=seed)


def _score_row(
    row: str, q_texts: list[str], p_idx: list[int], seed: int, texts: _Texts, judges: _Judges, ref_features: dict
) -> dict[str, float | None]:
    """One row's metrics for one seed: ``row`` is ``"model"`` (samples) or ``"references"`` (human).
    ``ref_features`` holds the references' features by judge (``"features"``, ``"topic"``)."""
    values: dict[str, float | None] = {}
    q_features = {}
    for key, metric in (("features", "mauve"), ("topic", "mauve_topic")):
        model = getattr(judges, key)
        if model is not None:
            q_features[key] = model(q_texts)
            values[metric] = _mauve(ref_features[key], p_idx, q_features[key], seed)
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
        key = judges.classifier_key
        if row == "model":
            values["class_accuracy"] = metrics.class_accuracy(judges.classifier, q_features[key], judges.class_name)
        elif texts.reference_labels:
            values["class_accuracy"] = metrics.class_accuracy(
                judges.classifier, ref_features[key][p_idx], judges.class_name
            )
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
        scored = {
            row: _score_row(row, q_texts, p_idx, seed, texts, judges, ref_features)
            for row, q_texts in (("model", samples[seed]), ("references", human))
        }
        if scored["model"].get("perplexity") and scored["references"].get("perplexity"):
            # How much less likely the samples are than human text, under the same judge.
            scored["model"]["perplexity_ratio"] = scored["model"]["perplexity"] / scored["references"]["perplexity"]
        for row, values in scored.items():
            for name, value in values.items():
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
    batch_size: int = 64,
    feature_model: str | FeatureModel | None = "auto",
    perplexity_model: str | PerplexityModel | None = "auto",
    topic_model: str | FeatureModel | None = TOPIC_JUDGE_MODEL,
    max_classifier_examples: int = 5000,
    tracking=None,
    device: str | torch.device | None = None,
    options: SamplingOptions | None = None,
    **option_changes,
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
        options, option_changes: how to sample (`SamplingOptions`, and any of its fields as a keyword).
        feature_model, perplexity_model: judge names (see `latentlm.evaluation.judges`), loaded models, or ``None`` to skip.
            The default MAUVE features are a causal LM's (``"auto"``: gpt2-large, offline SmolLM2), which
            see word order; ``perplexity_ratio`` is the samples' perplexity over the human row's.
        topic_model: the sentence-embedding judge of topic (default MiniLM): the ``mauve_topic`` column and
            the features of the class-accuracy probe; ``None`` skips it (the probe then reads
            ``feature_model``'s features).
        tracking: a ``TrackingConfig``; ``None`` uses the default one (``MLFLOW_TRACKING_URI`` or MLflow's
            local default store); ``TrackingConfig(enabled=False)`` logs nothing.

    Returns a dict with ``model`` and ``references`` rows (``{metric: {mean, std, per_seed}}`` or
    ``None`` where not computed; the references row is described in the module docstring), the
    settings, ``samples`` (``{seed: texts}``) and ``markdown``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (MAUVE compares distributions), got {num_samples}.")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed.")
    references_file = Path(references_file)
    options = SamplingOptions.of(options, **option_changes)
    pipeline = _load_pipeline(pipeline_dir, device)
    options = options.replace(scheduler=make_scheduler(pipeline.scheduler, options.scheduler))
    class_id = _class_id(pipeline, class_name) if class_name is not None else None
    texts = _read_evaluation_texts(pipeline, references_file, train_file, class_name, text_column, label_column)
    judges = _load_judges(
        feature_model, perplexity_model, topic_model, texts, class_name, max_classifier_examples, device
    )
    splits = _seed_splits(seeds, texts, num_samples)
    ref_features = {key: _reference_features(getattr(judges, key), texts, splits) for key in ("features", "topic")}

    sampling = dict(num_samples=num_samples, class_name=class_id, batch_size=batch_size, options=options)
    rows, samples, timings = _sample_and_score(pipeline, seeds, splits, texts, judges, ref_features, **sampling)
    result = build_result(
        pipeline_dir, references_file, train_file, class_name, num_samples, seeds, options, judges.names, rows, timings
    )
    result["markdown"] = format_markdown(result)
    _write_and_log(result, samples, pipeline_dir, output_dir, tracking)
    result["samples"] = samples
    return result


def _write_and_log(result, samples, pipeline_dir, output_dir, tracking) -> None:
    """Results and samples to ``output_dir`` (default ``<pipeline_dir>/evaluation``) and to MLflow."""
    if output_dir is None and isinstance(pipeline_dir, (str, Path)):
        output_dir = Path(pipeline_dir) / "evaluation"
    if output_dir is not None:
        write_results(Path(output_dir), result, samples)
    log_to_mlflow(result, samples, tracking, output_dir)
