"""Quickstart quality: grammar share and class share of samples, with and without guidance.

Samples from the quickstart pipeline are checked exactly with the corpus grammar
(`latentlm.data.restaurants.parse`): *grammar share* = accepted by the grammar, *class share* = accepted and
carrying the requested food type. Targets for 256 samples: >= 90 % grammatical and,
with guidance, >= 90 % of the requested class.

    python benchmarks/quickstart_quality.py                 # evaluate outputs/quickstart/pipeline
    python benchmarks/quickstart_quality.py --train         # run the quickstart first (timed)

Writes benchmarks/results/quickstart_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def evaluate(
    pipe, num_samples: int, guidance_scale: float, steps: int, scheduler: str, seed: int, batch_size: int = 64
) -> dict:
    from latentlm.data.restaurants import classify, parse
    from latentlm.sampling import sample

    class_names = pipe.class_names
    result: dict = {"guidance_scale": guidance_scale, "per_class": {}, "examples": []}
    accepted = correct = total = 0
    for k, name in enumerate(class_names):
        # spread num_samples over the classes as evenly as possible
        n = num_samples // len(class_names) + (1 if k < num_samples % len(class_names) else 0)
        rows = sample(
            None,
            class_name=name,
            num_samples=n,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            scheduler=scheduler,
            seed=seed + 1000 * k,
            batch_size=batch_size,
            pipe=pipe,
        )
        ok = sum(parse(r["text"]) is not None for r in rows)
        hit = sum(classify(r["text"]) == name for r in rows)
        result["per_class"][name] = {"n": n, "grammar_share": ok / n, "class_share": hit / n}
        result["examples"].extend(
            {
                "class": name,
                "text": r["text"],
                "grammatical": parse(r["text"]) is not None,
                "class_ok": classify(r["text"]) == name,
            }
            for r in rows[:3]
        )
        accepted, correct, total = accepted + ok, correct + hit, total + n
    result.update(num_samples=total, grammar_share=accepted / total, class_share=correct / total)
    return result


def evaluate_unconditional(pipe, num_samples: int, steps: int, scheduler: str, seed: int) -> dict:
    from latentlm.data.restaurants import parse
    from latentlm.sampling import sample

    rows = sample(
        None,
        class_name=None,
        num_samples=num_samples,
        num_inference_steps=steps,
        scheduler=scheduler,
        seed=seed,
        pipe=pipe,
    )
    return {
        "num_samples": len(rows),
        "grammar_share": sum(parse(r["text"]) is not None for r in rows) / len(rows),
        "examples": [r["text"] for r in rows[:5]],
    }


def reconstruction(pipe, corpus_dir: Path, n: int = 256) -> dict | None:
    """Exact match and BLEU of the pipeline's reconstructions (its own decoding settings) of the
    first ``n`` validation texts, against the texts as its tokenizer represents them."""
    from latentlm.data.loading import read_texts
    from latentlm.evaluation.reconstruction import evaluate_reconstruction

    path = corpus_dir / "validation.jsonl"
    if not path.is_file():
        return None
    texts, _ = read_texts(path)
    scores = evaluate_reconstruction(pipe, texts[:n], batch_size=64, generate_kwargs={}, num_examples=0)
    return {"num_texts": scores["num_samples"], "exact_match": scores["exact_match"], "bleu": scores["bleu"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override (with --train)")
    parser.add_argument("--train", action="store_true", help="run `latentlm train` on the config first, timed")
    parser.add_argument("--pipeline", default=None, help="pipeline folder (default: <output_dir>/pipeline)")
    parser.add_argument("-n", "--num-samples", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart_quality.json"))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from latentlm.config import load_config
    from latentlm.sampling import load_pipeline

    config = load_config(args.config, args.overrides)
    report: dict = {
        "config": str(Path(args.config).resolve().relative_to(ROOT))
        if Path(args.config).resolve().is_relative_to(ROOT)
        else args.config,
        "overrides": args.overrides,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
    }
    if args.train:
        from latentlm.training.run import train

        wall, cpu = time.perf_counter(), cpu_seconds()
        pipeline_dir = train(config)
        report["train"] = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(cpu_seconds() - cpu, 1),
            "loadavg_at_end": os.getloadavg(),
        }
        summary = Path(config.output_dir) / "train_summary.json"
        if summary.is_file():
            report["train"]["stages_wall_s"] = json.loads(summary.read_text())["timings_s"]
    pipeline_dir = Path(args.pipeline) if args.pipeline else Path(config.output_dir) / "pipeline"
    pipe = load_pipeline(pipeline_dir)
    report["pipeline"] = str(pipeline_dir)
    report["sampling"] = {
        "scheduler": args.scheduler,
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "decoding": {
            "pipeline_defaults": dict(pipe.config.get("decode_kwargs") or {}),
            "over": "text_codec.DEFAULT_GENERATE_KWARGS (LD4LG: 4 beams)",
        },
    }

    tick = time.perf_counter()
    report["unconditional"] = evaluate_unconditional(pipe, args.num_samples, args.steps, args.scheduler, args.seed)
    report["conditional_no_guidance"] = evaluate(pipe, args.num_samples, 1.0, args.steps, args.scheduler, args.seed)
    report["conditional_guided"] = evaluate(
        pipe, args.num_samples, args.guidance, args.steps, args.scheduler, args.seed
    )
    report["sampling_wall_s"] = round(time.perf_counter() - tick, 1)
    report["autoencoder_reconstruction"] = reconstruction(pipe, Path(config.output_dir) / "corpus")
    guided = report["conditional_guided"]
    report["targets"] = {
        "grammar_share>=0.9": guided["grammar_share"] >= 0.9,
        "class_share_with_guidance>=0.9": guided["class_share"] >= 0.9,
    }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_results("", report, out)
    summary = {
        "unconditional_grammar": report["unconditional"]["grammar_share"],
        "no_guidance": {k: report["conditional_no_guidance"][k] for k in ("grammar_share", "class_share")},
        f"guidance_{args.guidance}": {k: guided[k] for k in ("grammar_share", "class_share")},
        "train": report.get("train"),
        "targets_met": report["targets"],
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
