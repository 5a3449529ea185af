"""Evaluation of long texts: whole stories (MAUVE on an LM judge's features, perplexity ratio,
diversity, memorization, sentence counts) and the filling of a gap (BLEU-4, ROUGE-L and BERTScore
against the sentence that was left out). The scores take texts, so a latentlm pipeline and any other
model (the autoregressive peer of `benchmarks/long_text.py`) are judged the same way; `context_use`
asks a segment pipeline's denoiser how much it reads the story so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from latentlm.data.segments import segment_context, split_sentences
from latentlm.evaluation import metrics
from latentlm.evaluation.text_to_text import bert_score_f1, corpus_bleu, mean_rouge_l

__all__ = ["context_use", "infill_cases", "score_stories", "score_infills"]


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


@torch.no_grad()
def context_use(
    pipe,
    stories: Sequence[str],
    noise_level: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
    splitter: Callable[[str], list[str]] = split_sentences,
) -> dict[str, Any]:
    """How much a segment pipeline's denoiser reads its context.

    Every sentence after a story's first is encoded and noised to ``noise_level`` (t/T), and the
    denoiser predicts its latents (ẑ0, self-conditioned once, as `latentlm.diffusion.denoised_latents`)
    given the story before it, given the sentences before the same place in the next story (another
    story), and given no context; the same noise for all three. Returns each one's mean squared error
    against the sentence's latents and ``gain``, ``1 - own / other_story``: near 0, the denoiser
    writes a sentence the same whatever came before it.

    ``latent_variance`` (of the sentences' latents around their mean) is what an error reads against:
    ``none`` near it means the noisy latents alone tell the denoiser little, so the context has room to
    help. At low noise they tell it nearly everything and no context can lower the error much: hence
    the default of 0.9."""
    from diffusers import DDPMScheduler

    from latentlm.diffusion import denoised_latents

    pipe.check_segments()
    split = [splitter(story) for story in stories]
    cases = [(i, k) for i, sentences in enumerate(split) for k in range(1, len(sentences))]
    if not cases:
        raise ValueError("context_use needs stories of two sentences or more.")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    in_latents = pipe.config.get("segment_context") == "latents"

    def context(story: int, k: int):
        sentences = split[story][:k]
        return pipe.encode(sentences) if in_latents else segment_context(" ".join(sentences))

    def error(latents, states, mask, seed) -> torch.Tensor:
        denoiser = pipe.denoiser
        predicted = denoised_latents(
            denoiser,
            scheduler,
            latents.to(denoiser.device, denoiser.dtype),
            (noise_level, noise_level),
            generator=torch.Generator().manual_seed(seed),
            encoder_hidden_states=states.to(denoiser.device, denoiser.dtype),
            encoder_attention_mask=mask.to(denoiser.device),
        )
        return (predicted.float().cpu() - latents).square().mean(dim=(1, 2))

    errors, encoded = {"own": [], "other_story": [], "none": []}, []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        latents = pipe.encode([split[i][k] for i, k in batch]).float().cpu()
        encoded.append(latents)
        for name, shift in (("own", 0), ("other_story", 1)):
            sides = [context((i + shift) % len(split), k) for i, k in batch]
            if in_latents:
                states, mask = pipe.latent_context(len(batch), before=sides).repeated(1, "cpu", torch.float32)
            else:
                states, mask = pipe.encode_sources(sides)
            errors[name].append(error(latents, states, mask, seed + start))
        null = torch.zeros(len(batch), 1, pipe.denoiser.config.cross_attention_dim)
        errors["none"].append(error(latents, null, torch.zeros(len(batch), 1, dtype=torch.long), seed + start))
    result = {name: torch.cat(values).mean().item() for name, values in errors.items()}
    gain = 1.0 - result["own"] / result["other_story"]
    variance = torch.cat(encoded).var(dim=0, unbiased=False).mean().item()
    return {
        **result,
        "gain": gain,
        "latent_variance": variance,
        "num_sentences": len(cases),
        "noise_level": noise_level,
    }
