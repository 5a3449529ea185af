"""Classifier guidance on real text: the snippets' sentiment steered by a latent classifier on a
domain-conditioned pipeline (the denoiser never saw the sentiment).

    latentlm train-classifier --config configs/snippets.yaml --set data.path=../shared/data/snippets \\
        --set output_dir=outputs/snippets-long --autoencoder outputs/snippets-shared/autoencoder \\
        --label-column sentiment
    python benchmarks/control_real_text.py --pipeline outputs/snippets-long/pipeline --data ../shared/data/snippets

Per ``control_scale``: samples for each (sentiment, domain) with classifier-free guidance 2.0 on the
domain and DPM-Solver++ 25 steps; the share judged as the requested sentiment by the project's
held-apart evaluation classifier (logistic regression on MiniLM features of the training texts, as
`latentlm evaluate` trains it) and MAUVE (MiniLM features) against validation texts of that sentiment.
Writes benchmarks/results/control_real_text.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="outputs/snippets-long/pipeline")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "snippets"))
    parser.add_argument("--control", default="sentiment")
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 4, 16])
    parser.add_argument("-n", "--samples", type=int, default=24, help="samples per (sentiment, domain) and scale")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "control_real_text.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from latentlm.data.loading import read_texts
    from latentlm.evaluation import metrics
    from latentlm.evaluation.judges import load_feature_model
    from latentlm.sampling import load_pipeline, sample_texts

    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.control not in pipe.classifiers:
        raise SystemExit(f"{args.pipeline} carries no classifier {args.control!r} ({sorted(pipe.classifiers)}).")
    sentiments = list(pipe.classifiers[args.control].config.class_names)
    data = Path(args.data)
    train_texts, train_labels = read_texts(data / "train.jsonl", "text", args.control)
    val_texts, val_labels = read_texts(data / "validation.jsonl", "text", args.control)
    features = load_feature_model("minilm")
    pool = random.Random(0).sample(list(zip(train_texts, train_labels)), min(5000, len(train_texts)))
    judge = metrics.train_text_classifier(features([t for t, _ in pool]), [label for _, label in pool])
    reference_features = {
        s: features([t for t, lab in zip(val_texts, val_labels) if lab == s][:500]) for s in sentiments
    }

    result = {
        "benchmark": "control_real_text",
        "command": "python benchmarks/control_real_text.py " + " ".join(argv or sys.argv[1:]),
        "pipeline": args.pipeline,
        "control": args.control,
        "domains": pipe.class_names,
        "guidance_scale": args.guidance,
        "steps": args.steps,
        "samples_per_sentiment_and_domain": args.samples,
        "judge": "logistic regression on MiniLM features of 5000 training texts",
    }
    noise_levels = Path(args.pipeline) / "classifiers" / args.control / "noise_levels.json"
    if noise_levels.is_file():
        result["classifier_accuracy_at_t"] = json.loads(noise_levels.read_text())
    # the judge on the references themselves: its own ceiling
    result["references"] = {s: metrics.class_accuracy(judge, reference_features[s], s) for s in sentiments}
    rows = []
    for scale in args.scales:
        tick = time.perf_counter()
        row = {"control_scale": scale}
        for i, sentiment in enumerate(sentiments):
            texts = []
            for j, domain in enumerate(pipe.class_names):
                texts += [
                    r["text"]
                    for r in sample_texts(
                        pipe,
                        args.samples,
                        class_name=domain,
                        guidance_scale=args.guidance,
                        num_inference_steps=args.steps,
                        scheduler="dpm++",
                        seed=1000 * i + 10 * j,
                        controls={args.control: sentiment} if scale else None,
                        control_scale=scale,
                    )
                ]
            q = features(texts)
            row[sentiment] = {
                "accuracy": metrics.class_accuracy(judge, q, sentiment),
                "mauve": metrics.mauve_score(reference_features[sentiment], q, seed=0),
                "examples": texts[:3],
            }
        row["accuracy"] = sum(row[s]["accuracy"] for s in sentiments) / len(sentiments)
        row["mauve"] = sum(row[s]["mauve"] for s in sentiments) / len(sentiments)
        row["seconds"] = round(time.perf_counter() - tick, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in sentiments}), flush=True)
    result["rows"] = rows
    common.write_results("", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
