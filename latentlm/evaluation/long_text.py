"""Evaluation of long texts: whole stories (MAUVE on an LM judge's features, perplexity ratio,
diversity, memorization, sentence counts) and the filling of a gap (BLEU-4, ROUGE-L and BERTScore
against the sentence that was left out). The scores take texts, so a latentlm pipeline and any other
model (the autoregressive peer of `benchmarks/long_text.py`) are judged the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from latentlm.data.segments import split_sentences
from latentlm.evaluation import metrics
from latentlm.evaluation.text_to_text import bert_score_f1, corpus_bleu, mean_rouge_l

__all__ = ["infill_cases", "score_stories", "score_infills"]


def infill_cases(
    stories: Sequence[str], gap: int = 2, splitter: Callable[[str], list[str]] = split_sentences
) -> list[tuple[str, str, str]]:
    """``(left, right, gold)`` for each story: the sentence at position ``gap`` (0-based) left out, the
    sentences before and after it. A story with no sentence at ``gap`` or after it is an error."""
    cases = []
    for index, story in enumerate(stories):
        sentences = splitter(story)
        if len(sentences) <= gap + 1:
            raise ValueError(
                f"story {index} has {len(sentences)} sentences: filling sentence {gap + 1} needs text after it "
                f"({story[:80]!r})."
            )
        cases.append((" ".join(sentences[:gap]), " ".join(sentences[gap + 1 :]), sentences[gap]))
    return cases


def score_stories(
    stories: Sequence[str],
    references: Sequence[str],
    train_texts: Sequence[str] | None,
    feature_model,
    perplexity_model,
    *,
    num_sentences: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """MAUVE of ``stories`` against ``references`` on ``feature_model``'s features, their perplexity
    under ``perplexity_model``, diversity, memorization of ``train_texts``, and the share of stories
    with exactly ``num_sentences`` sentences."""
    stories, references = list(stories), list(references)
    scores = [v for v in perplexity_model.per_text(stories) if v == v]
    counts = [len(split_sentences(story)) for story in stories]
    return {
        "mauve_lm": metrics.mauve_score(feature_model(references), feature_model(stories), seed=seed),
        "perplexity": sum(scores) / len(scores) if scores else None,
        "diversity": metrics.diversity(stories),
        "memorization": metrics.memorization(stories, list(train_texts)) if train_texts else None,
        "mean_sentences": sum(counts) / len(counts),
        "exact_sentences": None if num_sentences is None else sum(c == num_sentences for c in counts) / len(counts),
        "examples": stories[:5],
    }


def score_infills(outputs: Sequence[str], golds: Sequence[str], bert_model: str | None = "minilm") -> dict[str, Any]:
    """BLEU-4 (corpus), ROUGE-L F1 (mean) and BERTScore F1 of gap fillings against the left-out sentences."""
    outputs, golds = list(outputs), list(golds)
    bert, bert_name = bert_score_f1(outputs, golds, bert_model) if bert_model else (None, None)
    return {
        "bleu": corpus_bleu(outputs, golds),
        "rouge_l": mean_rouge_l(outputs, golds),
        "bertscore_f1": bert,
        "bertscore_model": bert_name,
        "examples": outputs[:5],
    }
