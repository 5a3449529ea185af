"""Reconstruction quality of a stage-1 model: texts -> latents -> texts, scored with sacrebleu BLEU and
exact match against what the tokenizer can represent (`normalized_reference`).

Used by stage-1 training (evaluation every ``eval_every`` steps) and by ``latentlm evaluate-autoencoder``
(`evaluate_autoencoder`: the scores of a saved model on a file of texts, as JSON, markdown and an MLflow run).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentlm.autoencoder.families import family_of
from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from latentlm.autoencoder.text_codec import DEFAULT_GENERATE_KWARGS, GREEDY_GENERATE_KWARGS
from latentlm.evaluation.metrics import exact_match, reconstruction_bleu

__all__ = [
    "normalized_reference",
    "reconstruct",
    "evaluate_reconstruction",
    "posterior_spread",
    "reconstruction_generate_kwargs",
    "evaluate_autoencoder",
]


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
def reconstruct(
    codec, texts: Sequence[str], batch_size: int = 64, context_texts: Sequence[str] | None = None, **generate_kwargs
) -> list[str]:
    """``codec.decode(codec.encode(texts))`` in batches; ``codec`` is a `TextAutoencoder` or a pipeline.
    ``context_texts`` (one per text): what a ``read_context`` decoder reads before each text's latents."""
    texts = list(texts)
    if context_texts is not None and len(context_texts) != len(texts):
        raise ValueError(f"{len(context_texts)} context_texts for {len(texts)} texts: give one per text.")
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        latents = codec.encode(texts[start : start + batch_size])
        if context_texts is not None:
            generate_kwargs["context_texts"] = list(context_texts[start : start + batch_size])
        out.extend(codec.decode(latents, **generate_kwargs))
    return out


@torch.no_grad()
def posterior_spread(model, texts: Sequence[str], batch_size: int = 64) -> float:
    """The posterior std of a variational `TextAutoencoder` ``model``: the root mean variance over every
    latent dimension of ``texts`` (comparable to a fixed ``latent_noise_std``)."""
    texts, variance, count = list(texts), 0.0, 0
    if not texts:
        raise ValueError("posterior_spread needs at least one text.")
    for start in range(0, len(texts), batch_size):
        batch = model.tokenize(texts[start : start + batch_size])
        states = model.encoder_states(batch["input_ids"], batch["attention_mask"])
        _, log_variance = model.autoencoder.posterior(states, batch["attention_mask"])
        if log_variance is None:
            raise ValueError("posterior_spread needs a variational autoencoder (built with variational=True).")
        variance += float(log_variance.exp().sum())
        count += log_variance.numel()
    return math.sqrt(variance / count)


def _references(codec, texts: Sequence[str]) -> list[str]:
    tokenizer = getattr(codec, "tokenizer", None)
    max_length = getattr(codec, "max_length", None) or getattr(getattr(codec, "config", None), "max_length", None)
    if tokenizer is None or max_length is None:
        return list(texts)
    special = family_of(codec.language_model).add_special_tokens
    return [normalized_reference(tokenizer, t, max_length, add_special_tokens=special) for t in texts]


@torch.no_grad()
def evaluate_reconstruction(
    codec,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    num_beams: int | None = 4,
    generate_kwargs: dict[str, Any] | None = None,
    num_examples: int = 16,
    context_texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """BLEU (0-100) and exact-match rate of ``codec``'s reconstructions of ``texts``.

    Scored against the texts as the tokenizer represents them (``bleu``, ``exact_match``) and as
    written (``bleu_raw_text``, ``exact_match_raw_text``). Decoding: ``generate_kwargs`` if given
    (``{}``: the codec's own defaults), else `reconstruction_generate_kwargs` for ``num_beams``. ``examples`` holds the first
    ``num_examples`` (input, reference, reconstruction) rows. A variational autoencoder's result adds
    ``posterior_std`` (`posterior_spread`). ``context_texts``: what a ``read_context`` decoder reads
    before each text's latents, as the pipeline gives it a segment's context.
    """
    texts = list(texts)
    if generate_kwargs is None:
        max_length = getattr(codec, "max_length", None) or codec.config.max_length
        generate_kwargs = reconstruction_generate_kwargs(max_length, num_beams or 1)
    was_training = getattr(codec, "training", False)
    if hasattr(codec, "eval"):
        codec.eval()
    spread = {}
    try:
        hypotheses = reconstruct(codec, texts, batch_size, context_texts, **generate_kwargs)
        if isinstance(codec, TextAutoencoder) and codec.autoencoder.config.get("variational"):
            spread["posterior_std"] = posterior_spread(codec, texts, batch_size)
    finally:
        if was_training:
            codec.train()
    references = _references(codec, texts)
    return {
        "num_samples": len(texts),
        **spread,
        "bleu": reconstruction_bleu(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
        "bleu_raw_text": reconstruction_bleu(hypotheses, texts),
        "exact_match_raw_text": exact_match(hypotheses, texts),
        "examples": [
            {"input": t, "reference": r, "reconstruction": h, "exact": h == r}
            for t, r, h in list(zip(texts, references, hypotheses))[:num_examples]
        ],
    }


def _load_codec(model_or_dir, device):
    """A pipeline or a TextAutoencoder (from a folder or as given): anything with encode/decode."""
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        if (folder / "model_index.json").is_file():
            from latentlm.sampling import load_pipeline

            return load_pipeline(folder, device)
        model = TextAutoencoder.from_pretrained(str(folder))
        if device is not None:
            model.to(device)
        return model.eval()
    return model_or_dir


#: what `evaluate_autoencoder` reports and logs (``posterior_std`` only for a variational autoencoder)
_SCORES = ("bleu", "exact_match", "bleu_raw_text", "exact_match_raw_text", "posterior_std")


def _autoencoder_markdown(result: dict[str, Any]) -> str:
    spread = result.get("posterior_std")
    return (
        "| | BLEU ↑ | Exact match ↑ |\n|---|---|---|\n"
        f"| reconstruction (vs tokenized text) | {result['bleu']:.2f} | {result['exact_match']:.3f} |\n"
        f"| reconstruction (vs raw text) | {result['bleu_raw_text']:.2f} | {result['exact_match_raw_text']:.3f} |\n"
    ) + (f"\nPosterior std (variational latents): {spread:.3f}\n" if spread is not None else "")


def evaluate_autoencoder(
    model_dir,
    references_file: str | Path,
    num_samples: int = 1000,
    *,
    text_column: str = "text",
    batch_size: int = 32,
    decode_kwargs: dict | None = None,
    output_dir: str | Path | None = None,
    tracking=None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Reconstruction BLEU (sacrebleu, 0-100) and exact match of the first ``num_samples`` references,
    against the texts as the tokenizer represents them (``bleu``, ``exact_match``) and as written
    (``bleu_raw_text``, ``exact_match_raw_text``); scored by `reconstruction.evaluate_reconstruction`.

    ``model_dir`` is a ``TextAutoencoder`` folder, a pipeline folder, or a loaded model with
    ``encode(texts) -> [B, N, D]`` and ``decode(latents, **kw) -> list[str]``. ``decode_kwargs``
    override the model's own decoding defaults (``None``: the defaults).
    """
    from latentlm.data.loading import read_texts

    codec = _load_codec(model_dir, device)
    texts, _ = read_texts(references_file, text_column)
    texts = texts[:num_samples]
    start = time.perf_counter()
    scores = evaluate_reconstruction(
        codec, texts, batch_size=batch_size, generate_kwargs=dict(decode_kwargs or {}), num_examples=len(texts)
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": str(model_dir) if isinstance(model_dir, (str, Path)) else type(model_dir).__name__,
        "references_file": str(references_file),
        "num_samples": scores["num_samples"],
        **{k: scores[k] for k in _SCORES if k in scores},
        "texts_per_second": len(texts) / seconds,
    }
    result["markdown"] = _autoencoder_markdown(result)
    examples = scores["examples"]
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "autoencoder_results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (folder / "autoencoder_results.md").write_text(result["markdown"])
    _log_autoencoder_to_mlflow(result, examples, tracking, output_dir)
    result["examples"] = examples
    return result


def _log_autoencoder_to_mlflow(result: dict[str, Any], examples: list[dict], tracking, output_dir) -> None:
    from latentlm.config import TrackingConfig
    from latentlm.mlflow.tracking import Tracker

    cfg = tracking if tracking is not None else TrackingConfig()
    if not cfg.enabled:
        return
    with Tracker(cfg, run_name=cfg.run_name or "evaluate-autoencoder", fallback_dir=output_dir) as tracker:
        tracker.log_params(
            {"evaluate_autoencoder": {k: result[k] for k in ("model", "references_file", "num_samples")}}
        )
        tracker.log_metrics({k: result[k] for k in _SCORES if k in result}, step=0)
        tracker.log_table(examples, "reconstructions.json")
