"""Plug-and-play control on the quickstart: classifier guidance by latent classifiers the denoiser was
never conditioned on, checked exactly by the corpus grammar's parser.

Train the quickstart and its classifiers first (the classifiers are added to the pipeline folder):

    latentlm train --config configs/quickstart.yaml
    latentlm train-classifier --config configs/quickstart.yaml --label-column price
    latentlm train-classifier --config configs/quickstart.yaml --target length
    python benchmarks/control.py --pipeline outputs/quickstart/pipeline

Measures, with DPM-Solver++ 25 steps:
- price range by classifier guidance against ``control_scale``: control accuracy (the parsed price is
  the requested one) and the grammatical share (the parser accepts the text); samples spread evenly
  over the food classes, without classifier-free guidance;
- composition: food by classifier-free guidance (2.0) and price by classifier guidance: share with both;
- length: mean absolute error in tokens against the requested length;
- the cost: seconds per sampling step with and without the classifier's gradient.

Writes benchmarks/results/control_quickstart.json and the curve as benchmarks/results/control_quickstart.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="outputs/quickstart/pipeline")
    parser.add_argument("--control", default="price", help="classification control (a corpus attribute)")
    parser.add_argument("--length-control", default="length", help="regression control of the length in tokens")
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("-n", "--samples", type=int, default=60, help="samples per requested value and scale")
    parser.add_argument("--composition-scale", type=float, default=None, help="default: the best scale of the curve")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 14, 18, 22])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "control_quickstart.json"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "control_quickstart.png"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from latentlm.data import restaurants as corpus
    from latentlm.sampling import load_pipeline, make_scheduler, sample_texts

    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    for name in (args.control, args.length_control):
        if name not in pipe.classifiers:
            raise SystemExit(
                f"{args.pipeline} carries no classifier {name!r} ({sorted(pipe.classifiers)}); see --help."
            )
    values = [v for v in pipe.classifiers[args.control].config.class_names if v != "none"]
    foods = pipe.class_names

    def draw(value, scale, *, food=None, guidance=1.0, seed=0, n=args.samples):
        """n samples asking for ``value``; food classes cycle unless one is given."""
        texts, classes = [], []
        per_class = [food] if food else foods
        for k, cls in enumerate(per_class):
            count = n // len(per_class) + (k < n % len(per_class))
            rows = sample_texts(
                pipe,
                count,
                class_name=cls,
                guidance_scale=guidance,
                num_inference_steps=args.steps,
                scheduler="dpm++",
                seed=seed + 100 * k,
                controls={args.control: value} if scale else None,
                control_scale=scale,
            )
            texts += [r["text"] for r in rows]
            classes += [cls] * len(rows)
        return texts, classes

    result = {
        "benchmark": "control_quickstart",
        "command": "python benchmarks/control.py " + " ".join(argv or sys.argv[1:]),
        "pipeline": args.pipeline,
        "control": args.control,
        "values": values,
        "steps": args.steps,
        "scheduler": "dpm++",
        "samples_per_value": args.samples,
    }
    noise_levels = Path(args.pipeline) / "classifiers" / args.control / "noise_levels.json"
    if noise_levels.is_file():
        result["classifier_accuracy_at_t"] = json.loads(noise_levels.read_text())

    # 1. control accuracy and grammaticality against the scale
    curve = []
    for scale in args.scales:
        right = grammatical = total = 0
        for i, value in enumerate(values):
            texts, _ = draw(value, scale, seed=10_000 * i)
            parsed = [corpus.parse(t) for t in texts]
            total += len(texts)
            grammatical += sum(p is not None for p in parsed)
            right += sum(p is not None and p["price"] == value for p in parsed)
        point = {"control_scale": scale, "control_accuracy": right / total, "grammatical": grammatical / total}
        curve.append(point)
        print(json.dumps(point), flush=True)
    result["curve"] = curve
    ok = [p for p in curve if p["grammatical"] >= 0.95]
    best = max(ok or curve, key=lambda p: p["control_accuracy"])
    result["best"] = best

    # 2. composition: food by classifier-free guidance, price by classifier guidance
    scale = args.composition_scale if args.composition_scale is not None else best["control_scale"]
    both = total = 0
    for i, value in enumerate(values):
        for j, food in enumerate(foods):
            texts, _ = draw(value, scale, food=food, guidance=2.0, seed=50_000 + 1000 * i + j, n=args.samples // 3)
            parsed = [corpus.parse(t) for t in texts]
            total += len(texts)
            both += sum(p is not None and p["price"] == value and p["food"] == food for p in parsed)
    result["composition"] = {
        "control_scale": scale,
        "guidance_scale": 2.0,
        "both_right": both / total,
        "num_samples": total,
    }
    print(json.dumps(result["composition"]), flush=True)

    # 3. length control
    tokenizer = pipe.tokenizer
    length_rows = []
    for length_scale in (0.0, 4.0, 16.0, 64.0):
        errors, lengths = [], {}
        for length in args.lengths:
            rows = sample_texts(
                pipe,
                args.samples,
                num_inference_steps=args.steps,
                scheduler="dpm++",
                seed=70_000 + length,
                class_name=foods[length % len(foods)],
                controls={args.length_control: length} if length_scale else None,
                control_scale=length_scale,
            )
            got = [len(ids) for ids in tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]]
            errors += [abs(g - length) for g in got]
            lengths[str(length)] = sum(got) / len(got)
        length_rows.append(
            {
                "control_scale": length_scale,
                "mean_absolute_error": sum(errors) / len(errors),
                "mean_length_by_request": lengths,
            }
        )
        print(json.dumps(length_rows[-1]), flush=True)
    result["length"] = length_rows

    # 4. cost per step
    def seconds_per_step(controls):
        tick = time.perf_counter()
        pipe(
            num_samples=64,
            num_inference_steps=args.steps,
            output_type="latent",
            class_labels=foods[0],
            scheduler=make_scheduler(pipe.scheduler, "dpm++"),
            generator=torch.Generator().manual_seed(0),
            controls=controls,
            control_scale=best["control_scale"] or 1.0,
        )
        return (time.perf_counter() - tick) / args.steps

    seconds_per_step(None)  # warm-up
    result["seconds_per_step_batch_64"] = {
        "without_control": min(seconds_per_step(None) for _ in range(3)),
        "with_control": min(seconds_per_step({args.control: values[0]}) for _ in range(3)),
    }
    print(json.dumps(result["seconds_per_step_batch_64"]), flush=True)

    common.write_results("", result, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [p["control_scale"] for p in curve]
        ax.plot(xs, [p["control_accuracy"] for p in curve], "o-", label="control accuracy")
        ax.plot(xs, [p["grammatical"] for p in curve], "s--", label="grammatical")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("control_scale")
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.set_title(f"classifier guidance on {args.control}")
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
