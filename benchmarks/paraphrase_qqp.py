"""Paraphrase generation on QQP with the project's best real-text autoencoder (SmolLM2, stage 1 of
``configs/smollm2-snippets.yaml``): a text-to-text stage 2 trained here within a time budget, then
scored by `latentlm.evaluation.text_to_text` (BLEU, ROUGE-L, BERTScore, self-BLEU) against the
copy-the-source baseline and the autoencoder's reconstruction of the gold target (the upper bound).

    python benchmarks/paraphrase_qqp.py --data ../shared/data/qqp \
        --autoencoder outputs/snippets-shared/autoencoder --budget-minutes 30

Pairs whose target is longer than the autoencoder reads (``max_length`` tokens) are left out of
training and evaluation, and counted in the result. Resumable: ``--resume`` continues stage 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import latentlm.pipelines  # noqa: F401  (imported before the long stage 2, not after it)
import torch
from latentlm.autoencoder.text_autoencoder import TextAutoencoder

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import latentlm.sampling  # noqa: E402, F401
from latentlm.config import load_config  # noqa: E402
from latentlm.evaluation.text_to_text import evaluate_text_to_text  # noqa: E402
from latentlm.training.run import build_pipeline  # noqa: E402
from latentlm.training.stages.diffusion import train_diffusion  # noqa: E402

GREEDY = {"num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0, "max_length": 64}


def filter_pairs(source: Path, out: Path, tokenizer, max_length: int, add_special_tokens: bool) -> dict:
    """Copy the pairs whose target fits in ``max_length`` tokens; returns the counts."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    lengths = [
        len(ids) for ids in tokenizer([r["target"] for r in rows], add_special_tokens=add_special_tokens)["input_ids"]
    ]
    kept = [row for row, length in zip(rows, lengths) if length <= max_length]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return {"pairs": len(rows), "kept": len(kept)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/qqp", help="folder with train.jsonl / validation.jsonl")
    parser.add_argument("--autoencoder", default="outputs/snippets-shared/autoencoder")
    parser.add_argument("--output-dir", default="outputs/qqp-paraphrase")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--max-steps", type=int, default=900)
    parser.add_argument("--num-sources", type=int, default=200)
    parser.add_argument("--mbr-sources", type=int, default=50, help="sources scored with MBR-5 (it samples 5x)")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/paraphrase_qqp.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)

    model = TextAutoencoder.from_pretrained(args.autoencoder)
    counts = {
        split: filter_pairs(
            Path(args.data) / f"{split}.jsonl", output_dir / "data" / f"{split}.jsonl", model.tokenizer,
            model.max_length, not model.causal,
        )
        for split in ("train", "validation")
    }  # fmt: skip
    del model

    config = load_config(
        {
            "output_dir": str(output_dir),
            "data": {"path": str(output_dir / "data"), "source_column": "source", "target_column": "target"},
            "diffusion": {
                "denoiser_size": "small",
                "mixed_precision": "bf16",
                "ema_decay": 0.999,
                "source_dropout_prob": 0.1,
                "sample_every": 0,
                "save_every": 250,
                "optimizer": {
                    "learning_rate": 1e-3,
                    "batch_size": 64,
                    "max_steps": args.max_steps,
                    "warmup_steps": 100,
                    "lr_schedule": "cosine",
                },
            },
            "tracking": {"enabled": False},
        }
    )
    start = time.perf_counter()
    final = train_diffusion(config, args.autoencoder, resume=args.resume, time_budget_s=60 * args.budget_minutes)
    wall_minutes = (time.perf_counter() - start) / 60
    history = json.loads((output_dir / "diffusion_history.json").read_text())

    pipe = build_pipeline(args.autoencoder, final, decode_kwargs=GREEDY)
    validation = output_dir / "data" / "validation.jsonl"
    settings = dict(source_column="source", target_column="target", num_inference_steps=args.steps, scheduler="dpm++")
    results = []
    for name, kwargs in (
        ("no guidance", dict(num_sources=args.num_sources, num_samples_per_source=2)),
        ("guidance 2.0", dict(num_sources=args.num_sources, guidance_scale=2.0)),
        ("guidance 2.0 + MBR-5", dict(num_sources=args.mbr_sources, mbr_candidates=5, guidance_scale=2.0)),
    ):
        result = evaluate_text_to_text(
            pipe,
            validation,
            reconstruction=name == "no guidance",
            output_dir=output_dir / "eval" / name,
            **settings,
            **kwargs,
        )
        result.pop("markdown")
        result["condition"] = name
        print(json.dumps(result), flush=True)
        results.append(result)

    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "autoencoder": args.autoencoder,
        "pairs": counts,
        "stage2_steps": history["final_step"],
        "stage2_train_minutes": round(history["train_time_s"] / 60, 1),
        "stage2_wall_minutes_this_call": round(wall_minutes, 1),
        "decoding": GREEDY,
        "results": results,
        "paper": {
            "LD4LG (bart-base, GPU)": {"rouge_l": 60.3, "bertscore": 85.8},
            "DiffuSeq": {"rouge_l": 52.7, "bertscore": 82.4},
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    common.write_results("", out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
