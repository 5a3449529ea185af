"""Soft prompt or key/value prefix: which way of handing the latents to a decoder-only LM learns faster.

Compares the validation BLEU curves (greedy, the 50 texts stage 1 evaluates during training) of
two stage-1 runs on the snippets, against training minutes, from their history files:

    # soft prompt (the shipped recipe: alignment warm-up, then LoRA)
    latentlm train-autoencoder --config configs/smollm2-snippets.yaml --set data.path=../shared/data/snippets \
        --set output_dir=outputs/stage1-long --set autoencoder.optimizer.max_steps=3000 \
        --set autoencoder.eval_every=700 --set data.max_eval_samples=50 --time-budget 52
    # key/value prefix (same recipe; no alignment loss, which needs a soft prompt; LoRA from step 0)
    latentlm train-autoencoder --config configs/smollm2-snippets.yaml --set data.path=../shared/data/snippets \
        --set output_dir=outputs/stage1-kv --set autoencoder.model.causal.memory=key_value_prefix \
        --set autoencoder.alignment_weight=0 --set autoencoder.alignment_warmup_steps=0 \
        --set autoencoder.eval_every=150 --set autoencoder.optimizer.max_steps=3000 --time-budget 31.3
    python benchmarks/causal_memory.py --soft-prompt outputs/stage1-long --key-value-prefix outputs/stage1-kv

Writes benchmarks/results/causal_memory.json: both curves, each run's seconds per step, and the
BLEU of each at the key/value run's last evaluation minute (the soft prompt's curve interpolated
linearly between its evaluations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HISTORY = "autoencoder_history.json"


def curve(run: Path) -> dict:
    history = json.loads((run / HISTORY).read_text())
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    points = [
        {
            "step": h["step"],
            "minutes": round(h["train_time_s"] / 60, 2),
            "bleu": round(h["bleu"], 2),
            "exact_match": h.get("exact_match"),
        }
        for h in history["history"]
        if "bleu" in h
    ]
    return {
        "run": str(run),
        "causal_memory": "key_value_prefix" if "causal_memory: key_value_prefix" in config else "soft_prompt",
        "final_step": history["final_step"],
        "train_minutes": round(history["train_time_s"] / 60, 2),
        "seconds_per_step": round(history["train_time_s"] / max(history["final_step"], 1), 3),
        "curve": points,
    }


def bleu_at(points: list[dict], minutes: float) -> float | None:
    """The curve's BLEU at ``minutes``, linear between evaluations (None outside the curve)."""
    for a, b in zip(points, points[1:]):
        if a["minutes"] <= minutes <= b["minutes"]:
            w = (minutes - a["minutes"]) / max(b["minutes"] - a["minutes"], 1e-9)
            return round(a["bleu"] + w * (b["bleu"] - a["bleu"]), 2)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soft-prompt", required=True, help="stage-1 run folder with a soft prompt")
    parser.add_argument("--key-value-prefix", required=True, help="stage-1 run folder with a key/value prefix")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "causal_memory.json"))
    args = parser.parse_args(argv)
    soft, prefix = curve(Path(args.soft_prompt)), curve(Path(args.key_value_prefix))
    if prefix["causal_memory"] != "key_value_prefix" or soft["causal_memory"] != "soft_prompt":
        print("error: pass a soft-prompt run and a key_value_prefix run (see the runs' config.yaml)", file=sys.stderr)
        return 2
    last = prefix["curve"][-1]
    result = {
        "benchmark": "causal_memory",
        "command": "python benchmarks/causal_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "eval": "greedy BLEU on the first 50 validation snippets, during training",
        "soft_prompt": soft,
        "key_value_prefix": prefix,
        "at_equal_minutes": {
            "minutes": last["minutes"],
            "key_value_prefix_bleu": last["bleu"],
            "soft_prompt_bleu": bleu_at(soft["curve"], last["minutes"]),
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["at_equal_minutes"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
