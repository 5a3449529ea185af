"""Data-to-text on the restaurant corpus: slot accuracy of a text-to-text pipeline.

Each validation meaning representation (``name[The Eagle], food[Italian], ...``, the ``mr`` column of
``builtin:restaurants``) is given as the source; a generated sentence counts as correct when the
corpus' exact acceptor parses it and its attributes are exactly the source's slots (none missing,
none added, none changed). Reported without guidance, with guidance 2.0, and with MBR-5, with
DPM-Solver++ 25 steps, plus seconds per source and the accuracy on meaning representations never
seen in training.

    latentlm train --config configs/restaurants-data-to-text.yaml
    python benchmarks/data_to_text.py --pipeline outputs/restaurants-data-to-text/pipeline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path
import torch

from latentlm.data.restaurants import generate_examples, parse, slots_match
from latentlm.sampling import load_pipeline, sample_texts

# builtin:restaurants (latentlm.training.run.prepare_data -> corpus.write_corpus) with seed 0
TRAIN_SEED, VALIDATION_SEED, NUM_TRAIN = 0, 1_000_003, 20_000

CONDITIONS = (("no guidance", 1.0, 1), ("guidance 2.0", 2.0, 1), ("MBR-5", 1.0, 5), ("guidance 2.0 + MBR-5", 2.0, 5))


def score(rows: list[dict], seen: set[str]) -> dict:
    correct = [slots_match(row["text"], row["source"]) for row in rows]
    unseen = [ok for ok, row in zip(correct, rows) if row["source"] not in seen]
    return {
        "slot_accuracy": sum(correct) / len(rows),
        "grammatical": sum(parse(row["text"]) is not None for row in rows) / len(rows),
        "slot_accuracy_unseen_mr": sum(unseen) / len(unseen) if unseen else None,
        "num_unseen_mr": len(unseen),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--num-sources", type=int, default=300)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100, help="texts per pipeline call (candidates included)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/data_to_text.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    sources = [e["mr"] for e in generate_examples(args.num_sources, VALIDATION_SEED)]
    seen = {e["mr"] for e in generate_examples(NUM_TRAIN, TRAIN_SEED)}

    results, examples = [], {}
    for name, guidance, candidates in CONDITIONS:
        start = time.perf_counter()
        rows = sample_texts(
            pipe,
            1,
            source_texts=sources,
            guidance_scale=guidance,
            num_inference_steps=args.steps,
            scheduler=args.scheduler,
            seed=args.seed,
            batch_size=args.batch_size,
            mbr_candidates=candidates,
        )
        seconds = time.perf_counter() - start
        result = {
            "condition": name,
            "guidance_scale": guidance,
            "mbr_candidates": candidates,
            **score(rows, seen),
            "seconds_per_source": seconds / len(sources),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
        examples[name] = [{"source": row["source"], "text": row["text"]} for row in rows[:5]]

    # `latentlm train` writes its stage timings beside the pipeline folder
    summary = Path(args.pipeline).parent / "train_summary.json"
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "pipeline": args.pipeline,
        "train_timings_s": json.loads(summary.read_text())["timings_s"] if summary.is_file() else None,
        "num_sources": len(sources),
        "validation_mr_seen_in_training": sum(s in seen for s in sources) / len(sources),
        "scheduler": args.scheduler,
        "num_inference_steps": args.steps,
        "threads": args.threads,
        "results": results,
        "examples": examples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    common.write_results("", out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
