"""Sentences cut short: how likely the pipeline's language model finds each sentence's closing mark.

A decoder that writes from few latents sometimes closes a sentence before its words end ("Susie was
walking on the swings because she."). `latentlm.pipelines.long_text.sentence_end_log_likelihood`
scores ``log p(closing mark | the text before, the sentence's words)``; `SamplingOptions.cut_sentence_logprob`
draws again a segment that scores below a threshold. This script shows where to put it: the scores of
the references' own sentences (how many a threshold would draw again wrongly) beside those of the
sentences in stories the pipeline writes without the option, each share below each threshold, and the
lowest-scoring sentences of both.

    python benchmarks/sentence_ends.py --run outputs/rocstories --data ../shared/data/rocstories --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import torch
from latentlm.pipelines import SamplingOptions
from latentlm.pipelines.long_text import sentence_end_log_likelihood

from latentlm.data.loading import read_texts
from latentlm.data.segments import ends_sentence, split_sentences


def sentence_rows(stories: list[str]) -> tuple[list[str], list[str]]:
    """Each closed sentence of ``stories`` and the text of its story before it."""
    befores, sentences = [], []
    for story in stories:
        parts = split_sentences(story)
        for i, sentence in enumerate(parts):
            if ends_sentence(sentence):
                befores.append(" ".join(parts[:i]))
                sentences.append(sentence)
    return befores, sentences


def summary(pipe, stories: list[str], thresholds: list[float], shown: int = 8) -> dict:
    befores, sentences = sentence_rows(stories)
    scores = sentence_end_log_likelihood(pipe.tokenizer, pipe.language_model, befores, sentences)
    order = scores.argsort().tolist()
    return {
        "sentences": len(sentences),
        "percentiles": {f"{q:g}": float(scores.quantile(q / 100)) for q in (0.5, 1, 2, 5, 50)},
        "share_below": {f"{t:g}": float((scores < t).float().mean()) for t in thresholds},
        "lowest": [
            {"log_prob": float(scores[i]), "sentence": sentences[i], "before": befores[i]} for i in order[:shown]
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a `latentlm train` run with data.segments")
    parser.add_argument("--data", required=True, help="folder with validation.jsonl of stories")
    parser.add_argument("--num-references", type=int, default=100, help="validation stories after the first 250")
    parser.add_argument("--num-stories", type=int, default=50, help="stories the pipeline writes")
    parser.add_argument("--num-segments", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[-8.0, -9.0, -10.0, -11.0, -12.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/sentence_ends.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentlm.sampling import load_pipeline

    references = read_texts(Path(args.data) / "validation.jsonl")[0][250 : 250 + args.num_references]
    pipe = load_pipeline(Path(args.run) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(args.seed)
    options = SamplingOptions(num_inference_steps=args.steps)
    stories = pipe(num_samples=args.num_stories, num_segments=args.num_segments, options=options).texts
    payload = {
        "run": args.run,
        "steps": args.steps,
        "references": summary(pipe, references, args.thresholds),
        "model": summary(pipe, stories, args.thresholds),
        "examples": stories[:5],
    }
    for name in ("references", "model"):
        shares = ", ".join(f"< {t}: {s:.3f}" for t, s in payload[name]["share_below"].items())
        print(f"{name:>10} ({payload[name]['sentences']} sentences): {shares}")
    common.write_results("sentence_ends", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
