"""Real text end to end: stage-1 reconstruction and the LD4LG evaluation of a snippets pipeline.

Train first (both stages; the config reads builtin:snippets, the measured run reads the shared
split the numbers are reported on):

    latentlm train --config configs/snippets.yaml --set data.path=../shared/data/snippets \
        --set output_dir=outputs/snippets-shared
    python benchmarks/real_text.py --run outputs/snippets-shared --data ../shared/data/snippets

Reports, to benchmarks/results/real_text.json:
- stage 1: reconstruction BLEU (greedy) and exact match on 500 validation texts, the BLEU curve
  against training minutes, and the time of each stage (from the run's history files);
- stage 2: per domain, 250 samples, MAUVE / perplexity / diversity / memorization / class accuracy
  without and with classifier-free guidance, beside the references' own row and the autoencoder's
  reconstructions of the references (an upper reference row). Offline judges: SmolLM2-135M
  last-token features for MAUVE (the default of `latentlm evaluate`) and perplexity, MiniLM sentence
  features for the topic MAUVE column and the class-accuracy probe; perplexity ratio = samples' over
  the human row's.

``--summary-out`` also writes the mean over classes of the references and of one guidance row
(``--summary-guidance``) as ``{"mean_over_classes": {"references": ..., "model": ...}, "command", "cpu"}``
(benchmarks/results/fluent_text.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

from latentlm.evaluation.report import METRIC_NAMES  # noqa: E402

# the metrics of `latentlm evaluate`, in its order
METRICS = METRIC_NAMES
# the names of the summary file (benchmarks/results/fluent_text.json) for the same metrics
SUMMARY_KEYS = {
    "mauve": "mauve_lm",
    "mauve_topic": "mauve_minilm",
    "perplexity": "perplexity",
    "perplexity_ratio": "perplexity_ratio",
    "class_accuracy": "class_accuracy",
    "diversity": "diversity",
    "memorization": "memorization",
}


def score_texts(texts, refs, train_texts, judges, class_name, seed) -> dict:
    """The metrics of `texts` against `refs` (same class), as `latentlm evaluate` computes them: MAUVE
    on the LM judge's features (word order) and on the topic judge's (MiniLM), the class probe on the
    topic features."""
    from latentlm.evaluation import metrics

    features, topic, perplexity, classifier = judges
    q_topic = topic(texts)
    scores = [v for v in perplexity.per_text(texts) if v == v]
    return {
        "mauve": metrics.mauve_score(features(refs), features(texts), seed=seed),
        "mauve_topic": metrics.mauve_score(topic(refs), q_topic, seed=seed),
        "perplexity": sum(scores) / len(scores) if scores else None,
        "diversity": metrics.diversity(texts),
        "memorization": metrics.memorization(texts, train_texts),
        "class_accuracy": metrics.class_accuracy(classifier, q_topic, class_name),
    }


def load_ema_weights(denoiser, checkpoint: Path) -> None:
    """Put a stage-2 checkpoint's EMA weights into ``denoiser`` (every parameter is trained and averaged)."""
    import torch

    from latentlm.training.checkpoints import read_ema_shadow

    shadow, params = read_ema_shadow(checkpoint), list(denoiser.parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: {len(shadow)} EMA tensors for a denoiser of {len(params)} parameters.")
    with torch.no_grad():
        for param, average in zip(params, shadow):
            param.copy_(average.to(param.dtype))


def mean_rows(rows: list[dict]) -> dict:
    return {m: sum(r[m] for r in rows) / len(rows) for m in METRICS if all(r.get(m) is not None for r in rows)}


def write_summary(result: dict, guidance: float | None, out: str, details: str, later: bool = False) -> None:
    """The fluent_text.json summary of a result: the references' means over classes and one guidance
    row's (``guidance``; default: the last one measured), with the texts/s of that row. ``later``: written
    from a saved result (``--summary-from``); the summary also records this command."""
    settings, machine = result["settings"], dict(result["machine"])
    if "cpu" not in machine:  # a result written before the CPU's name was kept: this machine's
        import torch

        machine["cpu"] = common.environment(torch.device("cpu"))["cpu"]
    low, high = settings["guidance_interval"]
    interval = "" if (low, high) == (0.0, 1.0) else f", interval {low:g}-{high:g}"
    g = guidance if guidance is not None else float(list(result["seconds_per_sample"])[-1])
    model_row = result["mean_over_classes"][f"model, guidance {g:g}{interval}"]
    summary = {
        "mean_over_classes": {
            "references": {SUMMARY_KEYS[m]: v for m, v in result["mean_over_classes"]["references"].items()},
            "model": {SUMMARY_KEYS[m]: v for m, v in model_row.items()}
            | {"texts_per_second": 1 / result["seconds_per_sample"][f"{g:g}"]},
        },
        "guidance": g,
        "decode_kwargs": settings["decode_kwargs"],
        "run": result["run"],
        "details": details,
        "command": result["command"],
        "cpu": machine.get("cpu_kind", "AVX512-BF16" if machine["native_bf16"] else "AVX2-only")
        + f" ({machine['cpu']})",
    }
    if later:
        summary["summary_command"] = " ".join(["python", *sys.argv])
    common.write_results("", summary, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/snippets-shared", help="output_dir of the trained run")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "snippets"))
    parser.add_argument("--label-column", default="domain")
    parser.add_argument("--reconstruction-texts", type=int, default=500, help="0: skip the stage-1 evaluation")
    parser.add_argument("--samples-per-class", type=int, default=250)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="guide only at noise levels t/T in [LOW, HIGH] (the pipeline's guidance_interval)",
    )
    parser.add_argument(
        "--per-class-guidance",
        nargs="+",
        default=None,
        metavar="CLASS=SCALE",
        help="also report the row that samples each class at its own scale (each one of --guidance)",
    )
    parser.add_argument("--classes", nargs="+", default=None, help="evaluate these classes only (default: all)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument(
        "--clamp-latents", action="store_true", help="put every step's ẑ0 on the latent sphere (clamp_latents)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-stage2", action="store_true")
    parser.add_argument(
        "--denoiser-checkpoint",
        default=None,
        help="a stage-2 checkpoint folder (<run>/diffusion_training/checkpoints/step_N): sample with its EMA weights",
    )
    parser.add_argument(
        "--skip-reconstruction-row", action="store_true", help="leave out the autoencoder's reconstructions row"
    )
    parser.add_argument(
        "--decode",
        default=None,
        help='decoding settings of the samples as JSON, e.g. \'{"do_sample": true, "top_p": 0.9}\' (default: the pipeline\'s)',
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_text.json"))
    parser.add_argument("--summary-out", default=None, help="also write the fluent_text.json summary here")
    parser.add_argument(
        "--summary-guidance", type=float, default=None, help="the summary's model row (default: the last --guidance)"
    )
    parser.add_argument(
        "--summary-from",
        default=None,
        help="write --summary-out from this earlier result JSON of real_text.py, without sampling again",
    )
    args = parser.parse_args(argv)
    if args.summary_from:
        if not args.summary_out:
            parser.error("--summary-from writes a summary: give --summary-out too.")
        write_summary(
            json.loads(Path(args.summary_from).read_text()),
            args.summary_guidance,
            args.summary_out,
            args.summary_from,
            later=True,
        )
        return 0
    decode_kwargs = json.loads(args.decode) if args.decode else None
    per_class_guidance = {}
    for item in args.per_class_guidance or []:
        name, _, scale = item.partition("=")
        try:
            scale = float(scale)
        except ValueError:
            scale = None
        if scale not in args.guidance:
            parser.error(
                f"--per-class-guidance {item!r}: use CLASS=SCALE with SCALE one of --guidance {args.guidance}."
            )
        per_class_guidance[name] = scale
    interval = (
        "" if tuple(args.guidance_interval) == (0.0, 1.0) else ", interval {:g}-{:g}".format(*args.guidance_interval)
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from latentlm.pipelines import LatentTextDiffusionPipeline

    from latentlm.config import TrackingConfig
    from latentlm.data.loading import read_texts
    from latentlm.evaluation import metrics
    from latentlm.evaluation.judges import load_feature_model, load_perplexity_model
    from latentlm.evaluation.protocol import evaluate_autoencoder
    from latentlm.evaluation.reconstruction import reconstruct
    from latentlm.hardware import has_native_bf16
    from latentlm.sampling import sample

    run, data = Path(args.run), Path(args.data)
    result: dict = {
        "benchmark": "real_text",
        "command": "python "
        + " ".join([Path(sys.argv[0]).name if sys.argv else "real_text.py", *(argv or sys.argv[1:])]),
        "run": str(run),
        "data": str(data),
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
    }
    # ---- training record
    stage_times = {}
    for stage, name in (
        ("backbone", None),
        ("autoencoder", "autoencoder_history.json"),
        ("decoder_tuning", "decoder_history.json"),
        ("diffusion", "diffusion_history.json"),
    ):
        if name and (run / name).is_file():
            history = json.loads((run / name).read_text())
            stage_times[stage] = {
                k: history.get(k) for k in ("final_step", "train_time_s", "encoder_cache_s", "latent_cache_s")
            }
            if stage == "autoencoder":
                result["autoencoder_curve"] = [
                    {
                        "step": h["step"],
                        "minutes": round(h["train_time_s"] / 60, 2),
                        "bleu": h["bleu"],
                        "exact_match": h["exact_match"],
                    }
                    for h in history.get("history", [])
                ]
    result["training"] = stage_times

    # ---- stage 1: reconstruction
    val_texts, val_labels = read_texts(data / "validation.jsonl", "text", args.label_column)
    train_texts, train_labels = read_texts(data / "train.jsonl", "text", args.label_column)
    tick = time.perf_counter()
    decoder = run / "decoder" if (run / "decoder").is_dir() else run / "autoencoder"  # what the pipeline decodes with
    recon = (
        None
        if args.reconstruction_texts == 0
        else evaluate_autoencoder(
            str(decoder),
            data / "validation.jsonl",
            num_samples=args.reconstruction_texts,
            decode_kwargs=dict(num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0),
            tracking=TrackingConfig(enabled=False),
            output_dir=None,
        )
    )
    if recon is not None:
        result["reconstruction"] = {
            "autoencoder": str(decoder),
            **{
                k: recon[k]
                for k in (
                    "num_samples",
                    "bleu",
                    "exact_match",
                    "bleu_raw_text",
                    "exact_match_raw_text",
                    "texts_per_second",
                )
            },
        }
        result["reconstruction"]["examples"] = recon["examples"][:8]
        result["reconstruction"]["seconds"] = round(time.perf_counter() - tick, 1)
        print(json.dumps(result["reconstruction"], indent=1)[:1500], flush=True)
    if args.skip_stage2:
        common.write_results("", result, args.out)
        return 0

    # ---- stage 2: LD4LG metrics per class
    pipe = LatentTextDiffusionPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    if args.denoiser_checkpoint:
        load_ema_weights(pipe.denoiser, Path(args.denoiser_checkpoint))
        result["denoiser_checkpoint"] = args.denoiser_checkpoint
    features = load_feature_model("smollm2")
    topic = load_feature_model("minilm")
    perplexity = load_perplexity_model("smollm2")
    rng = random.Random(args.seed)
    pool = rng.sample(list(zip(train_texts, train_labels)), min(5000, len(train_texts)))
    classifier = metrics.train_text_classifier(topic([t for t, _ in pool]), [label for _, label in pool])
    judges = (features, topic, perplexity, classifier)
    rows: dict[str, list[dict]] = {"references": []}
    if not args.skip_reconstruction_row:
        rows["reconstructions"] = []
    rows.update({f"model, guidance {g:g}{interval}": [] for g in args.guidance})
    if per_class_guidance:
        rows[f"model, per-class guidance{interval}"] = []
    classes = args.classes or pipe.class_names
    if set(classes) - set(pipe.class_names):
        parser.error(f"--classes {sorted(set(classes) - set(pipe.class_names))}: this pipeline has {pipe.class_names}.")
    if per_class_guidance and set(per_class_guidance) != set(classes):
        parser.error(f"--per-class-guidance must give one scale for each evaluated class: {classes}.")
    per_class: dict = {}
    timings = {}
    for k, name in enumerate(pipe.class_names):
        if name not in classes:
            continue
        refs = [t for t, label in zip(val_texts, val_labels) if label == name]
        n = min(args.samples_per_class, len(refs))
        refs = refs[:n]
        held_out = [t for t, label in zip(train_texts, train_labels) if label == name]
        human = random.Random(args.seed + k).sample(held_out, n)
        entry = {"num_references": n, "references": score_texts(human, refs, train_texts, judges, name, args.seed)}
        entry["references"]["memorization"] = metrics.memorization(refs, train_texts)
        if not args.skip_reconstruction_row:
            recon_texts = reconstruct(pipe, refs, batch_size=64)
            entry["reconstructions"] = score_texts(recon_texts, refs, train_texts, judges, name, args.seed)
            entry["reconstructions"]["examples"] = recon_texts[:4]
        for g in args.guidance:
            tick = time.perf_counter()
            samples = [
                r["text"]
                for r in sample(
                    None,
                    class_name=name,
                    num_samples=n,
                    guidance_scale=g,
                    guidance_interval=args.guidance_interval,
                    num_inference_steps=args.steps,
                    scheduler=args.scheduler,
                    clamp_latents=args.clamp_latents,
                    seed=args.seed + 1000 * k,
                    batch_size=64,
                    decode_kwargs=decode_kwargs,
                    pipe=pipe,
                )
            ]
            timings.setdefault(f"{g:g}", []).append((time.perf_counter() - tick) / n)
            key = f"model, guidance {g:g}{interval}"
            entry[key] = score_texts(samples, refs, train_texts, judges, name, args.seed)
            entry[key]["examples"] = samples[:8]
            rows[key].append(entry[key])
        if per_class_guidance:  # the same samples as that scale's row: the seed depends on the class only
            rows[f"model, per-class guidance{interval}"].append(
                entry[f"model, guidance {per_class_guidance[name]:g}{interval}"]
            )
        for key, row in entry.items():
            if isinstance(row, dict) and key != "references" and row.get("perplexity"):
                row["perplexity_ratio"] = row["perplexity"] / entry["references"]["perplexity"]
        rows["references"].append(entry["references"])
        if not args.skip_reconstruction_row:
            rows["reconstructions"].append(entry["reconstructions"])
        per_class[name] = entry
        print(
            name,
            json.dumps({key: {m: entry[key].get(m) for m in METRICS} for key in entry if key != "num_references"}),
            flush=True,
        )
    result["per_class"] = per_class
    result["mean_over_classes"] = {key: mean_rows(value) for key, value in rows.items()}
    result["seconds_per_sample"] = {g: sum(v) / len(v) for g, v in timings.items()}
    result["settings"] = {
        "samples_per_class": args.samples_per_class,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "clamp_latents": args.clamp_latents,
        "guidance_interval": list(args.guidance_interval),
        "per_class_guidance": per_class_guidance or None,
        "judges": {"features": features.name, "topic": topic.name, "perplexity": perplexity.name},
        "decode_kwargs": decode_kwargs,
    }
    result["machine"]["native_bf16"] = has_native_bf16("cpu")
    result["machine"]["cpu"] = common.environment(torch.device("cpu"))["cpu"]
    common.write_results("", result, args.out)
    print(json.dumps(result["mean_over_classes"], indent=1))
    if args.summary_out:
        write_summary(result, args.summary_guidance, args.summary_out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
