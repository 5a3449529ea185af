"""Evaluation of a text-to-text pipeline (``latentlm evaluate`` on a pipeline trained with a source).

For every source of a paired data file the pipeline generates ``num_samples_per_source`` texts (with
optional guidance and MBR); the first of them is scored against the gold target:

* BLEU (sacrebleu, corpus level) and ROUGE-L F1 (`rouge_score`, mean over sources);
* BERTScore F1 (`bert_score`; offline: all-MiniLM-L6-v2's last layer, no baseline rescaling; the
  model is named in the result, scores of different models are not comparable);
* self-BLEU across the samples of one source (diversity; lower = more diverse; needs >= 2 samples).

Two reference rows come with it: **copy source** (the source itself as the output: the baseline any
paraphraser must beat) and **autoencoder reconstruction** of the gold target (decode(encode(target)):
the upper bound the latent space allows).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from latentlm.pipelines.mbr import rouge_l
from latentlm.pipelines.sampling_options import SamplingOptions

__all__ = ["evaluate_text_to_text", "corpus_bleu", "mean_rouge_l", "self_bleu", "bert_score_f1", "is_text_to_text"]


def is_text_to_text(pipeline_dir: str | Path) -> bool:
    """Whether the saved pipeline's denoiser reads a source (without loading its weights)."""
    config = Path(pipeline_dir) / "denoiser" / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("cross_attention_dim") is not None


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)


def self_bleu(groups: Sequence[Sequence[str]]) -> float | None:
    """Mean over groups (the samples of one source) of each sample's BLEU against the others."""
    scores = [
        sacrebleu.sentence_bleu(text, [other for j, other in enumerate(group) if j != i]).score
        for group in groups
        if len(group) > 1
        for i, text in enumerate(group)
    ]
    return sum(scores) / len(scores) if scores else None


@functools.lru_cache(maxsize=2)
def _bert_scorer(model: str):
    """The `bert_score` scorer of ``model`` and its name, built once (it loads the model)."""
    from bert_score import BERTScorer

    from latentlm.autoencoder.backbones import minilm_path

    if model == "minilm":
        return BERTScorer(model_type=str(minilm_path()), num_layers=6), "all-MiniLM-L6-v2 (layer 6)"
    return BERTScorer(model_type=model, lang="en"), model


def bert_score_f1(hypotheses: Sequence[str], references: Sequence[str], model: str = "minilm") -> tuple[float, str]:
    """Mean BERTScore F1 (0-100) and the model's name. ``minilm`` is the offline all-MiniLM-L6-v2
    (layer 6); any other value is a `bert_score` model type (hub name or folder)."""
    scorer, name = _bert_scorer(model)
    _, _, f1 = scorer.score(list(hypotheses), list(references))
    return 100.0 * float(f1.mean()), name


def _read_pairs(
    path: str | Path, source_column: str, target_column: str, num_sources: int
) -> tuple[list[str], list[str]]:
    """The first ``num_sources`` (source, target) pairs of a local data file; an empty one is an error."""
    import datasets

    from latentlm.data.loading import FILE_BUILDERS

    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if not path.is_file() or builder in (None, "text"):
        raise FileNotFoundError(f"{str(path)!r}: pass a jsonl/json/csv/parquet file with source and target columns.")
    rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    for column in (source_column, target_column):
        if column not in rows.column_names:
            raise ValueError(
                f"{str(path)!r} has no column {column!r}; its columns are {rows.column_names}. "
                "Pass --source-column / --target-column."
            )
    rows = rows.select(range(min(num_sources, len(rows))))
    sources, targets = list(rows[source_column]), list(rows[target_column])
    for name, texts in ((source_column, sources), (target_column, targets)):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"{str(path)!r}: {len(bad)} rows have an empty {name!r} (first rows: {bad[:5]}).")
    return sources, targets


def _score_rows(rows: dict[str, list[str]], targets: list[str], bert_model: str | None) -> tuple[dict, str | None]:
    """``{row name: outputs}`` -> ``{row name: {bleu, rouge_l, bertscore_f1}}`` and the BERTScore model's name."""
    table, bert_name = {}, None
    for name, outputs in rows.items():
        bert, bert_name = bert_score_f1(outputs, targets, bert_model) if bert_model else (None, None)
        table[name] = {
            "bleu": corpus_bleu(outputs, targets),
            "rouge_l": mean_rouge_l(outputs, targets),
            "bertscore_f1": bert,
        }
    return table, bert_name


def _write_results(folder: Path, result: dict[str, Any], rows: list[dict], targets: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (folder / "results.md").write_text(result["markdown"])
    per_sample = [t for t in targets for _ in range(result["num_samples_per_source"])]
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as handle:
        for row, target in zip(rows, per_sample):
            handle.write(json.dumps({**row, "target": target}, ensure_ascii=False) + "\n")


def evaluate_text_to_text(
    pipeline_dir,
    data_file: str | Path,
    *,
    source_column: str = "source",
    target_column: str = "target",
    num_sources: int = 500,
    num_samples_per_source: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    bert_model: str | None = "minilm",
    reconstruction: bool = True,
    output_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    tracking=None,
    options: SamplingOptions | None = None,
    **option_changes,
) -> dict[str, Any]:
    """Score a text-to-text pipeline on the first ``num_sources`` pairs of ``data_file``; returns (and
    with ``output_dir`` writes ``results.json``, ``results.md`` and ``samples.jsonl``) the results.

    ``options``, ``option_changes``: how to sample (`SamplingOptions`, and any of its fields as a
    keyword). ``bert_model=None`` skips BERTScore; ``reconstruction=False`` skips the upper-bound row.
    ``tracking``: a ``TrackingConfig`` for the MLflow run that records the results (``None``: the
    default one, ``MLFLOW_TRACKING_URI`` or MLflow's local store; ``enabled=False``: none).
    """
    from latentlm.evaluation.reconstruction import reconstruct
    from latentlm.sampling import load_pipeline, sample_texts

    options = SamplingOptions.of(options, **option_changes)
    sources, targets = _read_pairs(data_file, source_column, target_column, num_sources)
    pipe = pipeline_dir if not isinstance(pipeline_dir, (str, Path)) else load_pipeline(pipeline_dir, device)
    pipe.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    rows = sample_texts(
        pipe, num_samples_per_source, source_texts=sources, seed=seed, batch_size=batch_size, options=options
    )
    seconds = time.perf_counter() - start
    groups = [
        [row["text"] for row in rows[i : i + num_samples_per_source]]
        for i in range(0, len(rows), num_samples_per_source)
    ]
    outputs = [group[0] for group in groups]

    scored = {"model": outputs, "copy source": sources}
    if reconstruction:
        scored["autoencoder reconstruction"] = reconstruct(pipe, targets, batch_size=batch_size)
    table, bert_name = _score_rows(scored, targets, bert_model)
    for name in table:
        table[name]["self_bleu"] = self_bleu(groups) if name == "model" else None
    result = {
        "pipeline": str(pipeline_dir) if isinstance(pipeline_dir, (str, Path)) else type(pipeline_dir).__name__,
        "data_file": str(data_file),
        "num_sources": len(sources),
        "num_samples_per_source": num_samples_per_source,
        "mbr_candidates": options.mbr_candidates,
        "mbr_metric": options.mbr_metric,
        "guidance_scale": options.guidance_scale,
        "guidance_interval": list(options.guidance_interval),
        "num_inference_steps": options.num_inference_steps,
        "scheduler": options.scheduler
        if isinstance(options.scheduler, str | None)
        else type(options.scheduler).__name__,
        "bertscore_model": bert_name,
        "seconds_per_source": seconds / len(sources),
        "rows": table,
    }
    result["markdown"] = format_markdown(result)
    if output_dir is not None:
        _write_results(Path(output_dir), result, rows, targets)
    _log_to_mlflow(result, rows, tracking, output_dir)
    return result


def _log_to_mlflow(result: dict[str, Any], rows: list[dict], tracking, output_dir) -> None:
    from latentlm.config import TrackingConfig
    from latentlm.mlflow.tracking import Tracker

    cfg = tracking if tracking is not None else TrackingConfig()
    if not cfg.enabled:
        return
    params = {k: v for k, v in result.items() if k not in ("rows", "markdown", "seconds_per_source")}
    metrics = {f"{row}/{name}": value for row, scores in result["rows"].items() for name, value in scores.items()}
    with Tracker(cfg, run_name=cfg.run_name or "evaluate-text-to-text", fallback_dir=output_dir) as tracker:
        tracker.log_params({"evaluate": params})
        tracker.log_metrics(
            {k.replace(" ", "_"): v for k, v in metrics.items() if v is not None}
            | {"seconds_per_source": result["seconds_per_source"]},
            step=0,
        )
        tracker.log_table(rows, "samples.json")
        tracker.log_dict({k: v for k, v in result.items() if k != "markdown"}, "results.json")
        tracker.log_text(result["markdown"], "results.md")


def format_markdown(result: dict[str, Any]) -> str:
    def cell(value):
        return "–" if value is None else f"{value:.1f}"

    lines = ["| | BLEU | ROUGE-L | BERTScore F1 | self-BLEU |", "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(
            f"| {name} | {cell(row['bleu'])} | {cell(row['rouge_l'])} | {cell(row['bertscore_f1'])} | {cell(row['self_bleu'])} |"
        )
    lines.append("")
    lines.append(
        f"{result['num_sources']} sources, {result['num_samples_per_source']} sample(s) each, guidance "
        f"{result['guidance_scale']}, MBR-{result['mbr_candidates']} ({result['mbr_metric']}); "
        f"{result['seconds_per_source']:.2f} s per source; BERTScore: {result['bertscore_model'] or 'skipped'}."
    )
    return "\n".join(lines) + "\n"
