"""Sample quality against the number of inference steps, for DDPM, DDIM and DPM-Solver++: which
step count is enough. Each point is a full `latentlm.evaluation.protocol.evaluate` run (MAUVE, perplexity,
diversity, memorization, class accuracy, mean ± std over seeds).

    python benchmarks/sampling_quality.py [PIPELINE_DIR] [--references FILE --train FILE] [--class NAME] [--quick]

Without --references the quickstart restaurant corpus (`latentlm.data.restaurants`) is written and used; for
texts of that grammar the exact acceptor `latentlm.data.restaurants.parse` also gives the share of
grammatical samples. Writes benchmarks/results/sampling_quality.json; the PNG and each grid point's
samples go under outputs/benchmarks/. Logs to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common

from latentlm.config import TrackingConfig
from latentlm.data.loading import read_texts
from latentlm.data.restaurants import classify, parse
from latentlm.evaluation import judges
from latentlm.evaluation import protocol as evaluation

FULL_GRID = {"ddpm": [50, 100, 250], "ddim": [10, 25, 50, 100], "dpm++": [10, 25, 50]}
QUICK_GRID = {"ddpm": [250], "ddim": [50], "dpm++": [25]}


def grammar_scores(texts: list[str], class_name: str | None) -> dict[str, float]:
    parsed = [parse(t) for t in texts]
    scores = {"grammatical": sum(p is not None for p in parsed) / len(texts)}
    if class_name is not None:
        scores["grammatical_and_class"] = sum(classify(t) == class_name for t in texts) / len(texts)
    return scores


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--references", default=None, help="human texts (default: the quickstart corpus validation split)"
    )
    parser.add_argument("--train", default=None, help="training texts (default: the quickstart corpus train split)")
    parser.add_argument("--class", dest="class_name", default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="per seed (default 256, quick 32)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--feature-model", default="auto")
    parser.add_argument("--perplexity-model", default="auto")
    parser.add_argument("--greedy", action="store_true", help="decode greedily instead of the LD4LG beam search")
    parser.add_argument(
        "--grid",
        nargs="+",
        default=None,
        metavar="SCHEDULER:STEPS,...",
        help="e.g. ddpm:50,250 ddim:10,50 dpm++:10,25 (default: the full grid; quick: the three headline settings)",
    )
    args = parser.parse_args()
    device = common.setup(args)
    pipe, folder, description = common.load_pipeline(args.pipeline, device, args.build, args.denoiser_size)
    if args.references is None:
        corpus = common.tiny_corpus_dir()
        references, train = corpus / "validation.jsonl", corpus / "train.jsonl"
    else:
        references, train = Path(args.references), Path(args.train) if args.train else None
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.grid:
        grid = {item.split(":")[0]: [int(n) for n in item.split(":")[1].split(",")] for item in args.grid}
    num_samples = args.num_samples or (32 if args.quick else 256)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    decode_kwargs = dict(common.FAST_DECODE) if args.greedy else None

    # Judges load once (SmolLM2's GGUF takes ~20 s) and are shared by every grid point.
    start = time.perf_counter()
    features = None if args.feature_model == "none" else judges.load_feature_model(args.feature_model, device=device)
    ppl = (
        None if args.perplexity_model == "none" else judges.load_perplexity_model(args.perplexity_model, device=device)
    )
    print(f"judges loaded in {time.perf_counter() - start:.1f} s", flush=True)
    ref_texts, _ = read_texts(references)
    # Grammaticality only means something for texts of the quickstart grammar.
    head = ref_texts[:200]
    check_grammar = sum(parse(t) is not None for t in head) >= 0.9 * len(head)

    rows = []
    payload = {
        "benchmark": "sampling_quality",
        "pipeline": description,
        "quick": args.quick,
        "references": str(references),
        "train": str(train) if train else None,
        "class_name": args.class_name,
        "num_samples": num_samples,
        "seeds": seeds,
        "decoding": "greedy" if args.greedy else "LD4LG beam search",
        "feature_model": features.name if features else None,
        "perplexity_model": ppl.name if ppl else None,
        "environment": common.environment(device),
        "results": rows,
    }
    # Each grid point's results.json / samples.jsonl go in outputs/benchmarks/<results file name>/.
    results_dir = common.OUTPUTS_DIR / (Path(args.out).stem if args.out else "sampling_quality")
    for scheduler, step_list in grid.items():
        for steps in step_list:
            pipe.scheduler = common.make_scheduler(pipe.scheduler, scheduler)
            start = time.perf_counter()
            result = evaluation.evaluate(
                pipe,
                references,
                train,
                class_name=args.class_name,
                num_samples=num_samples,
                seeds=seeds,
                output_dir=results_dir / f"{scheduler}_{steps}",
                num_inference_steps=steps,
                decode_kwargs=decode_kwargs,
                feature_model=features,
                perplexity_model=ppl,
                tracking=TrackingConfig(enabled=False),
                device=device,
            )
            row = {
                "scheduler": scheduler,
                "steps": steps,
                "seconds": time.perf_counter() - start,
                "texts_per_second": result["texts_per_second"],
                "model": result["model"],
                "references": result["references"],
            }
            if check_grammar:
                per_seed = [grammar_scores(texts, args.class_name) for texts in result["samples"].values()]
                row["grammar"] = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
            rows.append(row)
            summary = {k: round(v["mean"], 3) for k, v in result["model"].items() if v is not None}
            print(
                f"{scheduler:>6} {steps:>4} steps: {summary} {row.get('grammar', '')} ({row['seconds']:.0f} s)",
                flush=True,
            )
            # Written after every point, so a run cut short keeps what it measured.
            path = common.write_results("sampling_quality", payload, args.out)

    panels = []
    for metric in ("mauve", "perplexity", "diversity"):
        if rows and rows[0]["model"].get(metric) is not None:
            series = {
                s: (
                    [r["steps"] for r in rows if r["scheduler"] == s],
                    [r["model"][metric]["mean"] for r in rows if r["scheduler"] == s],
                )
                for s in grid
            }
            panels.append(
                {"title": metric, "xlabel": "inference steps", "ylabel": metric, "logx": True, "series": series}
            )
    if check_grammar:
        panels.append(
            {
                "title": "grammatical share",
                "xlabel": "inference steps",
                "ylabel": "share",
                "logx": True,
                "series": {
                    s: (
                        [r["steps"] for r in rows if r["scheduler"] == s],
                        [r["grammar"]["grammatical"] for r in rows if r["scheduler"] == s],
                    )
                    for s in grid
                },
            }
        )
    png = (
        common.plot(common.OUTPUTS_DIR / f"{path.stem}.png", panels, f"quality vs steps: {description}")
        if panels
        else None
    )
    metrics = []
    for r in rows:
        values = {f"{r['scheduler']}/{m}": v["mean"] for m, v in r["model"].items() if v is not None}
        values.update({f"{r['scheduler']}/{k}": v for k, v in r.get("grammar", {}).items()})
        metrics.append((values, r["steps"]))
    common.log_to_mlflow(
        args,
        "sampling_quality",
        {"pipeline": description, "num_samples": num_samples, "seeds": json.dumps(seeds), "quick": args.quick},
        metrics,
        [p for p in (path, png) if p is not None],
    )


if __name__ == "__main__":
    main()
