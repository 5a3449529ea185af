"""Reconstruction quality of a stage-1 model: texts -> latents -> texts, scored with sacrebleu BLEU and
exact match against what the tokenizer can represent (`normalized_reference`).

Used by stage-1 training (evaluation every ``eval_every`` steps) and by ``latentlm evaluate-autoencoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latentlm.autoencoder.text_codec import DEFAULT_GENERATE_KWARGS, GREEDY_GENERATE_KWARGS
from latentlm.metrics import exact_match, reconstruction_bleu

__all__ = ["normalized_reference", "reconstruct", "evaluate_reconstruction", "reconstruction_generate_kwargs"]


def normalized_reference(tokenizer, text: str, max_length: int, add_special_tokens: bool = True) -> str:
    """What a perfect reconstruction can be: the text after tokenization (case folding, truncation)."""
    ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


def reconstruction_generate_kwargs(max_length: int, num_beams: int) -> dict[str, Any]:
    """Decoding for reconstruction: LD4LG's beam search, or plain greedy for ``num_beams=1`` (the
    repetition controls are beam-search heuristics and would break exact copies)."""
    base = GREEDY_GENERATE_KWARGS if num_beams == 1 else DEFAULT_GENERATE_KWARGS
    return dict(base, max_length=max_length + 8, num_beams=num_beams)


@torch.no_grad()
def reconstruct(codec, texts: Sequence[str], batch_size: int = 64, **generate_kwargs) -> list[str]:
    """``codec.decode(codec.encode(texts))`` in batches; ``codec`` is a `TextAutoencoder` or a pipeline."""
    texts = list(texts)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        out.extend(codec.decode(codec.encode(texts[start : start + batch_size]), **generate_kwargs))
    return out


def _references(codec, texts: Sequence[str]) -> list[str]:
    tokenizer = getattr(codec, "tokenizer", None)
    max_length = getattr(codec, "max_length", None) or getattr(getattr(codec, "config", None), "max_length", None)
    if tokenizer is None or max_length is None:
        return list(texts)
    causal = getattr(codec, "causal", None)
    if causal is None:  # a pipeline: ask its language model
        from latentlm.autoencoder.text_codec import is_causal_lm

        causal = is_causal_lm(codec.language_model)
    return [normalized_reference(tokenizer, t, max_length, add_special_tokens=not causal) for t in texts]


@torch.no_grad()
def evaluate_reconstruction(
    codec,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    num_beams: int | None = 4,
    generate_kwargs: dict[str, Any] | None = None,
    num_examples: int = 16,
) -> dict[str, Any]:
    """BLEU (0-100) and exact-match rate of ``codec``'s reconstructions of ``texts``.

    Scored against the texts as the tokenizer represents them (``bleu``, ``exact_match``) and as
    written (``bleu_raw_text``, ``exact_match_raw_text``). Decoding: ``generate_kwargs`` if given
    (``{}``: the codec's own defaults), else `reconstruction_generate_kwargs` for ``num_beams``. ``examples`` holds the first
    ``num_examples`` (input, reference, reconstruction) rows.
    """
    texts = list(texts)
    if generate_kwargs is None:
        max_length = getattr(codec, "max_length", None) or codec.config.max_length
        generate_kwargs = reconstruction_generate_kwargs(max_length, num_beams or 1)
    was_training = getattr(codec, "training", False)
    if hasattr(codec, "eval"):
        codec.eval()
    try:
        hypotheses = reconstruct(codec, texts, batch_size, **generate_kwargs)
    finally:
        if was_training:
            codec.train()
    references = _references(codec, texts)
    return {
        "num_samples": len(texts),
        "bleu": reconstruction_bleu(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
        "bleu_raw_text": reconstruction_bleu(hypotheses, texts),
        "exact_match_raw_text": exact_match(hypotheses, texts),
        "examples": [
            {"input": t, "reference": r, "reconstruction": h, "exact": h == r}
            for t, r, h in list(zip(texts, references, hypotheses))[:num_examples]
        ],
    }
