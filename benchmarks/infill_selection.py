"""Which of k gap fillings to keep: the rules compared on the same candidates.

A pipeline trained on segments fills each validation story's gap (sentence ``gap + 1``) k times, with
its saved infill decoding (or ``--infill-decoding``). Each rule then keeps one filling per gap, and
the kept fillings are scored against the left-out sentences (BLEU-4, ROUGE-L, BERTScore), as
`benchmarks/long_text.py` scores them:

* ``first``: the first candidate (what ``infill_candidates=1`` writes);
* ``right_after_filling``: the largest ``log p(right | left filling)`` under the pipeline's language
  model (what ``SamplingOptions.infill_candidates`` keeps);
* ``filling_and_right``: the largest ``log p(filling right | left)``;
* ``filling``: the largest ``log p(filling | left)``;
* ``right_after_filling_plus_filling_per_token``: the largest ``log p(right | left filling)`` plus
  ``log p(filling | left)`` per token of the filling;
* ``mbr_rouge_l``: the candidate with the highest mean ROUGE-L to the others (``mbr_candidates``);
* ``oracle``: the one with the highest ROUGE-L to the gold sentence (a ceiling, not a rule).

The likelihood rules score with the pipeline's language model (its tuned decoder's LoRA merged in,
as ``infill_candidates`` scores); ``--backbone-scorer smollm2`` scores them also with the backbone as it
was before training (rows ``<rule> (backbone)``), on the same candidates.

As in the pipeline, an unfinished filling (no closing ``.``, ``!`` or ``?``) is kept only where all
of a gap's are.

    python benchmarks/infill_selection.py --run outputs/rocstories --data ../shared/data/rocstories \\
        --candidates 4 --threads 2 [--backbone-scorer smollm2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import torch
from latentlm.pipelines import SamplingOptions
from latentlm.pipelines.long_text import continuation_log_likelihood
from latentlm.pipelines.mbr import mbr_select, rouge_l

from latentlm.data.loading import read_texts
from latentlm.data.segments import ends_sentence, split_sentences
from latentlm.evaluation.long_text import infill_cases, score_infills

RULES = (
    "first",
    "right_after_filling",
    "filling_and_right",
    "filling",
    "right_after_filling_plus_filling_per_token",
    "mbr_rouge_l",
    "oracle",
)
LIKELIHOOD_RULES = ("right_after_filling", "filling_and_right", "filling", "right_after_filling_plus_filling_per_token")


def joined(*parts: str) -> str:
    return " ".join(part.strip() for part in parts if part.strip())


def likelihood_scores(scorer, cases, candidates: list[list[str]]) -> dict[str, torch.Tensor]:
    """The score ``[gaps, k]`` of every candidate under each of `LIKELIHOOD_RULES`, by ``scorer`` (a
    ``(tokenizer, causal LM)``); each likelihood computed once."""
    tokenizer, language_model = scorer
    lefts, rights, fillings = zip(
        *((left, right, filling) for (left, right, _), group in zip(cases, candidates) for filling in group)
    )

    def log_likelihood(prefixes, continuations):
        scores = continuation_log_likelihood(tokenizer, language_model, list(prefixes), list(continuations))
        return scores.reshape(len(cases), -1)

    right_after_filling = log_likelihood(map(joined, lefts, fillings), rights)
    filling = log_likelihood(lefts, fillings)
    tokens = torch.tensor([len(tokenizer(" " + filling.strip())["input_ids"]) for filling in fillings])
    return {
        "right_after_filling": right_after_filling,
        "filling_and_right": log_likelihood(lefts, map(joined, fillings, rights)),
        "filling": filling,
        "right_after_filling_plus_filling_per_token": right_after_filling + filling / tokens.reshape(len(cases), -1),
    }


def choose(rule: str, cases, candidates: list[list[str]], likelihoods: dict | None = None) -> list[str]:
    """Each gap's kept filling under ``rule`` (one of `RULES`); a likelihood rule reads its scores from
    ``likelihoods`` (`likelihood_scores` of these candidates, or of more per gap: the first k are read)."""
    k = len(candidates[0])
    flat = [(case, filling) for case, group in zip(cases, candidates) for filling in group]
    if rule == "first":
        scores = torch.zeros(len(flat))
    elif rule == "mbr_rouge_l":
        chosen = mbr_select([filling for _, filling in flat], k, "rouge_l")
        return [flat[i][1] for i in chosen]
    elif rule == "oracle":
        scores = torch.tensor([rouge_l(filling, gold) for (_, _, gold), filling in flat])
    elif rule in LIKELIHOOD_RULES:
        scores = likelihoods[rule][:, :k].reshape(-1)
    else:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}.")
    unfinished = torch.tensor([not ends_sentence(filling) for _, filling in flat])
    scores = scores.masked_fill(unfinished, float("-inf")).reshape(len(cases), k)
    kept = [int(row.argmax()) if row.isfinite().any() else 0 for row in scores]
    return [group[i] for group, i in zip(candidates, kept)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a `latentlm train` run with data.segments")
    parser.add_argument("--data", required=True, help="folder with validation.jsonl of stories")
    parser.add_argument("--num-stories", type=int, default=250)
    parser.add_argument("--gap", type=int, default=2, help="the 0-based position of the sentence to fill")
    parser.add_argument("--candidates", type=int, default=4, help="fillings drawn per gap")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--segment-retries", type=int, default=SamplingOptions.segment_retries)
    parser.add_argument("--infill-decoding", type=json.loads, default={}, help="JSON over the saved infill decoding")
    parser.add_argument("--batch-size", type=int, default=16, help="gaps per pipeline call (x candidates rows)")
    parser.add_argument(
        "--also-first", type=int, default=None, help="also apply the rules to each gap's first N candidates"
    )
    parser.add_argument(
        "--backbone-scorer", default=None, help="also score the likelihood rules with this backbone's own LM (smollm2)"
    )
    parser.add_argument("--bert-model", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/infill_selection.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentlm.sampling import load_pipeline

    validation = read_texts(Path(args.data) / "validation.jsonl")[0][: args.num_stories]
    cases = infill_cases([s for s in validation if len(split_sentences(s)) > args.gap + 1], gap=args.gap)
    pipe = load_pipeline(Path(args.run) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    options = SamplingOptions(
        num_inference_steps=args.steps, segment_retries=args.segment_retries, decode_kwargs=args.infill_decoding
    )
    torch.manual_seed(args.seed)
    candidates = []
    for start in range(0, len(cases), args.batch_size):
        chunk = [(left, right) for left, right, _ in cases[start : start + args.batch_size]]
        # a gap repeated k times in one call: its k candidates drawn side by side, as infill_candidates draws them
        texts = pipe(infill=[pair for pair in chunk for _ in range(args.candidates)], options=options).texts
        candidates.extend(texts[i : i + args.candidates] for i in range(0, len(texts), args.candidates))
    golds = [gold for _, _, gold in cases]
    scorers = {"": (pipe.tokenizer, pipe.language_model)}
    if args.backbone_scorer:
        from latentlm.autoencoder.backbones import load_backbone

        tokenizer, language_model = load_backbone(args.backbone_scorer)
        scorers[" (backbone)"] = (tokenizer, language_model.eval())
    groups = {"": candidates}
    if args.also_first:
        if not 1 < args.also_first < args.candidates:
            raise SystemExit(f"--also-first must lie between 1 and --candidates ({args.candidates}), exclusive.")
        groups[f" of {args.also_first}"] = [group[: args.also_first] for group in candidates]
    likelihoods = {by: likelihood_scores(scorer, cases, candidates) for by, scorer in scorers.items()}
    rows = {
        rule + of + by: score_infills(choose(rule, cases, group, likelihoods[by]), golds, args.bert_model)
        for of, group in groups.items()
        for by in scorers
        for rule in (RULES if not by else LIKELIHOOD_RULES)
    }
    for rule, row in rows.items():
        print(f"{rule:>54}: BLEU {row['bleu']:.2f}  ROUGE-L {row['rouge_l']:.2f}  BERTScore {row['bertscore_f1']:.2f}")
    payload = {
        "run": args.run,
        "candidates": args.candidates,
        "gaps": len(cases),
        "gap": args.gap,
        "steps": args.steps,
        "segment_retries": args.segment_retries,
        "pipeline_infill_decode_kwargs": dict(pipe.config.get("infill_decode_kwargs") or {}),
        "infill_decoding": args.infill_decoding,
        "backbone_scorer": args.backbone_scorer,
        "also_first": args.also_first,
        "rules": rows,
        "examples": [
            {"left": c[0], "right": c[1], "gold": c[2], "candidates": g} for c, g in zip(cases[:5], candidates)
        ],
    }
    common.write_results("infill_selection", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
