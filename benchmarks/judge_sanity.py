"""Can a judge tell language from word salad? References against held-apart references, against the
same held-apart texts with their words shuffled, and with 30 % of their words replaced by random
corpus words.

For every judge: MAUVE with its features (the LM judge: a causal LM's last-token states, what
``latentlm evaluate`` uses by default; the topic judge: MiniLM sentence embeddings), and the
perplexity judge's mean perplexity and its ratio to the held-apart references'. A judge fit for
fluency must score shuffled and corrupted text far below real text.

    python benchmarks/judge_sanity.py --data ../shared/data/snippets [--num-texts 500] [--threads 2]

Writes benchmarks/results/judge_sanity.json (``--out``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = ("held-apart references", "words shuffled", "30% of words replaced")


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def replace_words(text: str, vocabulary: list[str], share: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), round(share * len(words))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def variants(texts: list[str], vocabulary: list[str], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        VARIANTS[0]: texts,
        VARIANTS[1]: [shuffle_words(t, rng) for t in texts],
        VARIANTS[2]: [replace_words(t, vocabulary, 0.3, rng) for t in texts],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with validation.jsonl (and train.jsonl) of texts")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--num-texts", type=int, default=500, help="texts on each side of MAUVE")
    parser.add_argument(
        "--feature-models",
        nargs="+",
        default=["smollm2", "minilm"],
        help="judges of MAUVE (latentlm.evaluation.judges names)",
    )
    parser.add_argument("--perplexity-model", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from latentlm.data.loading import read_texts
    from latentlm.evaluation import metrics
    from latentlm.evaluation.judges import load_feature_model, load_perplexity_model
    from latentlm.hardware import has_native_bf16

    data = Path(args.data)
    texts, _ = read_texts(data / "validation.jsonl", args.text_column)
    if (data / "train.jsonl").is_file():
        texts += read_texts(data / "train.jsonl", args.text_column)[0]
    texts = [t for t in dict.fromkeys(texts) if len(t.split()) >= 2]
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    if len(texts) < 2 * args.num_texts:
        parser.error(
            f"{data} holds {len(texts)} distinct texts of 2+ words; --num-texts {args.num_texts} needs twice that."
        )
    references, held_apart = texts[: args.num_texts], texts[args.num_texts : 2 * args.num_texts]
    vocabulary = sorted({w for t in texts for w in t.split()})
    q_sides = variants(held_apart, vocabulary, args.seed)

    result: dict = {
        "benchmark": "judge_sanity",
        "command": "python benchmarks/judge_sanity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": common.environment(torch.device("cpu")) | {"native_bf16": has_native_bf16("cpu")},
        "data": str(data),
        "num_texts": args.num_texts,
        "examples": {name: side[:3] for name, side in q_sides.items()},
        "mauve": {},
    }
    for name in args.feature_models:
        tick = time.perf_counter()
        judge = load_feature_model(name)
        p = judge(references)
        result["mauve"][name] = {v: metrics.mauve_score(p, judge(q), seed=args.seed) for v, q in q_sides.items()}
        result["mauve"][name]["pooling"] = judge.pooling
        result["mauve"][name]["seconds"] = round(time.perf_counter() - tick, 1)
        print(name, result["mauve"][name], flush=True)
        del judge
    perplexity = load_perplexity_model(args.perplexity_model)
    means = {v: perplexity(q) for v, q in q_sides.items()}
    base = means[VARIANTS[0]]
    result["perplexity"] = {
        "judge": perplexity.name,
        **{v: {"perplexity": mean, "ratio": mean / base} for v, mean in means.items()},
    }
    print("perplexity", result["perplexity"], flush=True)
    common.write_results("judge_sanity", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
