"""The results of ``latentlm evaluate``: the result dict (mean ± std over seeds per metric and row), its
markdown table, the files written beside it and the MLflow run that records it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METRIC_NAMES", "MeanStd", "build_result", "format_markdown", "mean_std", "write_results", "log_to_mlflow"]

METRIC_NAMES = ("mauve", "mauve_topic", "perplexity", "perplexity_ratio", "diversity", "memorization", "class_accuracy")
_METRIC_HEADERS = {
    "mauve": "MAUVE ↑",
    "mauve_topic": "MAUVE, topic ↑",
    "perplexity": "Perplexity ↓",
    "perplexity_ratio": "Perplexity ÷ human ↓",
    "diversity": "Diversity ↑",
    "memorization": "Memorization ↓",
    "class_accuracy": "Class accuracy ↑",
}


def build_result(
    pipeline_dir,
    references_file,
    train_file,
    class_name,
    num_samples,
    seeds,
    options,
    judge_names: tuple[str | None, str | None, str | None],
    rows,
    timings,
) -> dict[str, Any]:
    """The settings of an evaluation (``options``: its `SamplingOptions`, the scheduler built) and its
    ``model`` / ``references`` rows as mean ± std over seeds; ``judge_names``: the names of the feature, perplexity and topic models (None where not used)."""
    result: dict[str, Any] = {
        "pipeline": str(pipeline_dir) if isinstance(pipeline_dir, (str, Path)) else type(pipeline_dir).__name__,
        "references_file": str(references_file),
        "train_file": str(train_file) if train_file is not None else None,
        "class_name": class_name,
        "num_samples": num_samples,
        "seeds": seeds,
        "num_inference_steps": options.num_inference_steps,
        "scheduler": type(options.scheduler).__name__,
        "guidance_scale": options.guidance_scale,
        "guidance_interval": list(options.guidance_interval),
        "feature_model": judge_names[0],
        "perplexity_model": judge_names[1],
        "topic_model": judge_names[2],
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
    stats = mean_std(values)
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
            elif m not in ("perplexity", "perplexity_ratio") and 0 < abs(entry["mean"]) < 0.01:
                # Tiny values (diversity of a small grammar) would print as 0.000.
                cells.append(f"{entry['mean']:.2e} ± {entry['std']:.1e}")
            else:
                digits = {"perplexity": 1, "perplexity_ratio": 2}.get(m, 3)
                cells.append(f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}")
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    seeds = result.get("seeds", [])
    lines.append("")
    notes = [f"{result.get('num_samples')} samples × {len(seeds)} seeds"]
    if result.get("feature_model"):
        notes.append(f"MAUVE features: {result['feature_model']}")
    if result.get("topic_model"):
        notes.append(f"topic MAUVE and class accuracy features: {result['topic_model']}")
    if result.get("perplexity_model"):
        notes.append(f"perplexity judge: {result['perplexity_model']}")
    lines.append("; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


def write_results(folder: Path, result: dict[str, Any], samples: dict[int, list[str]]) -> None:
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


def log_to_mlflow(result: dict[str, Any], samples: dict[int, list[str]], tracking, output_dir) -> None:
    from latentlm.config import TrackingConfig
    from latentlm.mlflow.tracking import Tracker

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
            "guidance_interval",
            "feature_model",
            "perplexity_model",
            "topic_model",
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


@dataclass
class MeanStd:
    mean: float
    std: float
    values: list[float]

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value.")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return MeanStd(mean, 0.0, values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return MeanStd(mean, math.sqrt(var), values)
