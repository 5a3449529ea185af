"""Minimum-Bayes-risk selection among sampled candidates (LD4LG's MBR-k).

For each output, ``k`` candidates are sampled; the one with the highest mean similarity to the other
``k - 1`` (sentence BLEU or ROUGE-L F1) is returned: the candidate the others agree with most, which
trades a little diversity for fewer outliers.
"""

from __future__ import annotations

import functools

__all__ = ["MBR_METRICS", "rouge_l", "similarity", "mbr_select"]

#: similarity measures accepted by ``mbr_metric``
MBR_METRICS = ("bleu", "rouge_l")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0-100) of one pair (`rouge_score`, no stemming)."""
    return 100.0 * _rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure


def similarity(hypothesis: str, reference: str, metric: str) -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing) or ROUGE-L F1 of one pair, 0-100."""
    if metric == "bleu":
        import sacrebleu  # here, so that reading MBR_METRICS stays cheap

        return sacrebleu.sentence_bleu(hypothesis, [reference]).score
    if metric == "rouge_l":
        return rouge_l(hypothesis, reference)
    raise ValueError(f"Unknown MBR metric {metric!r}; use one of {MBR_METRICS}.")


def mbr_select(texts: list[str], num_candidates: int, metric: str = "bleu") -> list[int]:
    """Indices into ``texts`` (consecutive groups of ``num_candidates``) of each group's MBR choice."""
    if metric not in MBR_METRICS:
        raise ValueError(f"Unknown MBR metric {metric!r}; use one of {MBR_METRICS}.")
    if len(texts) % num_candidates:
        raise ValueError(f"{len(texts)} texts do not split into groups of {num_candidates} candidates.")
    chosen = []
    for start in range(0, len(texts), num_candidates):
        group = texts[start : start + num_candidates]
        if num_candidates == 1:
            chosen.append(start)
            continue
        scores = [
            sum(similarity(candidate, other, metric) for j, other in enumerate(group) if j != i)
            for i, candidate in enumerate(group)
        ]
        chosen.append(start + max(range(num_candidates), key=scores.__getitem__))
    return chosen
