"""Benchmark: stage 1 reconstruction quality of the offline MiniLM BERT2BERT backbone on snippets.

Trains `configs/minilm-snippets.yaml` for a fixed CPU time budget (training steps only; evaluation
time is not counted), then reports reconstruction BLEU and exact match on the snippets validation
split, with the curve, as JSON in benchmarks/results/autoencoder_recipe.json.

    python benchmarks/autoencoder_recipe.py            # the recorded run: 16 training minutes, 1 thread
    python benchmarks/autoencoder_recipe.py --budget-minutes 5 autoencoder.model.decoder=full   # overrides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

import torch  # noqa: E402
from latentlm.autoencoder.text_autoencoder import TextAutoencoder  # noqa: E402

from latentlm.config import load_config  # noqa: E402
from latentlm.evaluation.reconstruction import evaluate_reconstruction  # noqa: E402
from latentlm.training.stages.autoencoder import HISTORY_FILE, train_autoencoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "minilm-snippets.yaml"))
    parser.add_argument("--budget-minutes", type=float, default=16.0, help="training-time budget")
    parser.add_argument("--output-dir", default="/tmp/latentlm-bench/autoencoder_recipe")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "snippets"))
    parser.add_argument("--final-eval-samples", type=int, default=300, help="validation texts in the final eval")
    parser.add_argument(
        "--final-num-beams",
        type=int,
        nargs="+",
        default=[1],
        help="decodings of the final eval (1 = greedy, 4 = LD4LG beam search)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 on a shared 2-core machine: oversubscribed threads spin)",
    )
    parser.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "autoencoder_recipe.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. autoencoder.model.decoder=full")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [
        f"output_dir={args.output_dir}",
        f"data.path={args.data}",
        f"tracking.tracking_uri=sqlite:///{args.output_dir}/mlflow.db",
        *args.overrides,
    ]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, overrides)
    start = time.time()
    final_dir = train_autoencoder(config, time_budget_s=args.budget_minutes * 60)
    wall_train = time.time() - start
    run = json.loads((Path(config.output_dir) / HISTORY_FILE).read_text())

    model = TextAutoencoder.from_pretrained(final_dir)
    from latentlm.data.loading import load_texts

    val_texts = load_texts(config.data, config.data.validation_split, args.final_eval_samples)
    final = {}
    for beams in args.final_num_beams:
        tick = time.time()
        result = evaluate_reconstruction(model, val_texts, num_beams=beams, num_examples=10)
        final[f"beams_{beams}"] = {
            "bleu": round(result["bleu"], 2),
            "exact_match": round(result["exact_match"], 4),
            "eval_seconds": round(time.time() - tick, 1),
            "examples": result["examples"],
        }
        print(
            f"final ({len(val_texts)} validation texts, beams={beams}): BLEU {result['bleu']:.2f}, "
            f"exact match {result['exact_match']:.3f}"
        )

    report = {
        "benchmark": "autoencoder_recipe",
        "backbone": config.autoencoder.model.backbone,
        "data": "snippets (train -> validation)",
        "config": config.to_dict(),
        "overrides": args.overrides,
        "budget_minutes": args.budget_minutes,
        "train_minutes": round(run["train_time_s"] / 60, 2),
        "wall_minutes_including_eval_and_caching": round(wall_train / 60, 2),
        "steps": run["final_step"],
        "num_train_texts": run["num_train_texts"],
        "num_truncated_train_texts": run["num_truncated_train_texts"],
        "final_eval_samples": len(val_texts),
        "final": final,
        "curve": [{**h, "train_minutes": round(h["train_time_s"] / 60, 2)} for h in run["history"]],
        "loss_curve": run["loss_curve"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "note": "BLEU/exact match against the tokenizer-normalised reference (uncased WordPiece, truncated at "
        "max_length); curve points use greedy decoding on the first max_eval_samples validation texts.",
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("train_minutes", "steps")}, indent=2))
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
