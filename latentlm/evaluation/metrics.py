"""Metrics of the LD4LG evaluation protocol, as pure functions.

Nothing here reads files or downloads models: the callers (``latentlm.evaluation.protocol``, the benchmarks)
load the feature / perplexity models and pass them in, so every metric can be tested on small fixed
inputs and the judge models stay configurable (``gpt2-large`` with hub access, offline MiniLM and
SmolLM2 here).

Metrics:
    * :func:`mauve_score` -- MAUVE (``mauve-text``) between two sets of text features.
    * :func:`perplexity` -- mean per-text perplexity under a causal LM (as HF ``evaluate``'s
      ``perplexity`` metric, which LD4LG reports).
    * :func:`diversity` -- product over n = 2..4 of unique / total n-grams.
    * :func:`memorization` -- share of generated 4-grams that occur in the training texts.
    * :func:`train_text_classifier` + :func:`class_accuracy` -- share of samples that a classifier
      trained on labelled training data assigns to the requested class.
    * :func:`reconstruction_bleu`, :func:`exact_match` -- autoencoder reconstruction quality.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "tokenize_words",
    "ngrams",
    "ngram_repetition",
    "diversity",
    "memorization",
    "mauve_score",
    "text_features",
    "per_text_perplexity",
    "perplexity",
    "LinearTextClassifier",
    "train_text_classifier",
    "class_accuracy",
    "reconstruction_bleu",
    "exact_match",
]

_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, like BERT's ``BasicTokenizer``.

    LD4LG counts n-grams for diversity and memorization on BasicTokenizer tokens; that class is gone
    from transformers 5, so this reproduces its behaviour (lower case, accents stripped, every
    punctuation mark its own token).
    """
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    return _WORD_OR_PUNCT.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (empty when the sequence is shorter than ``n``)."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}.")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_texts(texts: Sequence[str], name: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string; wrap it in a list.")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty; pass at least one text.")


def ngram_repetition(texts: Sequence[str], n: int, tokenize: Callable[[str], list[str]] = tokenize_words) -> float:
    """Share of repeated n-grams over the whole set: ``1 - unique / total``.

    n-grams are pooled across all texts (a phrase shared by two samples counts as a repetition), as
    in LD4LG. Texts without any n-gram of order ``n`` contribute nothing; if no text has one the
    repetition is 1.0 (nothing diverse was produced), so a model that writes empty strings scores a
    diversity of 0 rather than an error.
    """
    _check_texts(texts, "texts")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(tokenize(text), n)
        unique.update(grams)
        total += len(grams)
    if total == 0:
        return 1.0
    return 1.0 - len(unique) / total


def diversity(
    texts: Sequence[str], orders: Iterable[int] = (2, 3, 4), tokenize: Callable[[str], list[str]] = tokenize_words
) -> float:
    """LD4LG diversity: product over ``orders`` of ``unique / total`` n-grams, in [0, 1]."""
    value = 1.0
    for n in orders:
        value *= 1.0 - ngram_repetition(texts, n, tokenize)
    return value


def memorization(
    texts: Sequence[str],
    training_texts: Iterable[str],
    n: int = 4,
    tokenize: Callable[[str], list[str]] = tokenize_words,
) -> float:
    """Share of the generated n-grams (with repeats) that occur anywhere in ``training_texts``.

    Returns 0.0 when the generated texts hold no n-gram of order ``n`` (nothing could be copied).
    """
    _check_texts(texts, "texts")
    seen: set[tuple[str, ...]] = set()
    for text in training_texts:
        seen.update(ngrams(tokenize(text), n))
    if not seen:
        raise ValueError(f"training_texts hold no {n}-gram; pass the (non-empty) training set.")
    total = copied = 0
    for text in texts:
        for gram in ngrams(tokenize(text), n):
            total += 1
            copied += gram in seen
    return copied / total if total else 0.0


def mauve_score(
    p_features,
    q_features,
    *,
    num_buckets: int | str = "auto",
    scaling_factor: float = 5.0,
    seed: int = 25,
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
) -> float:
    """MAUVE between human (``p_features`` [Np, H]) and model (``q_features`` [Nq, H]) texts.

    Wraps ``mauve.compute_mauve`` on precomputed features, so the feature model is the caller's
    choice (LD4LG: last-token ``gpt2-large`` states; offline: mean-pooled MiniLM, see
    :func:`text_features`). ``num_buckets="auto"`` uses ``min(Np, Nq) / 10`` k-means clusters.
    """
    try:
        import mauve
    except ImportError as err:  # keep the base install light: MAUVE is in the `eval` extra
        raise ImportError(
            "MAUVE needs the `mauve-text` package: pip install 'latentlm[eval]' (or pip install mauve-text)."
        ) from err
    p = _as_numpy(p_features, "p_features")
    q = _as_numpy(q_features, "q_features")
    if p.shape[1] != q.shape[1]:
        raise ValueError(
            f"p_features and q_features must come from the same feature model: got widths {p.shape[1]} and {q.shape[1]}."
        )
    if min(len(p), len(q)) < 2:
        raise ValueError("MAUVE needs at least 2 texts on each side.")
    out = mauve.compute_mauve(
        p_features=p,
        q_features=q,
        num_buckets=num_buckets,
        mauve_scaling_factor=scaling_factor,
        seed=seed,
        kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter,
        verbose=False,
    )
    return float(out.mauve)


def _as_numpy(features, name: str):
    import numpy as np

    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [num_texts, feature_dim], got shape {array.shape}.")
    return array


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def text_features(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer,
    *,
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """Embed texts with a transformers model: ``[num_texts, hidden_size]`` float32 on CPU.

    ``pooling="mean"`` averages the last hidden states over real tokens (sentence-transformers'
    MiniLM recipe); ``pooling="last"`` takes the state of the last real token (what ``mauve-text``
    does with GPT-2). ``model`` is a base model (``AutoModel``) or anything returning
    ``last_hidden_state`` / ``hidden_states``.
    """
    _check_texts(texts, "texts")
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = _model_device(model)
    chunks = []
    for batch in _right_padded_batches(tokenizer, texts, batch_size, max_length):
        batch = batch.to(device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            last = batch["attention_mask"].sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        chunks.append(pooled.float().cpu())
    return torch.cat(chunks)


def _right_padded_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, **kwargs):
    """``texts`` tokenized in batches, truncated and right-padded: a text's last real token stays at
    index length - 1."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=max_length,
            **kwargs,
        )


@torch.no_grad()
def per_text_perplexity(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer,
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    add_start_token: bool = True,
) -> list[float]:
    """Perplexity of each text under a causal LM; ``nan`` for a text with no scored token.

    With ``add_start_token`` the tokenizer's BOS token is prepended so the first word is scored too
    (HF ``evaluate``'s perplexity metric does the same).
    """
    _check_texts(texts, "texts")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bos = tokenizer.bos_token_id if add_start_token else None
    if add_start_token and bos is None:
        raise ValueError("add_start_token=True but the tokenizer has no bos_token; pass add_start_token=False.")
    device = _model_device(model)
    result: list[float] = []
    for batch in _right_padded_batches(
        tokenizer, texts, batch_size, max_length - (bos is not None), add_special_tokens=False
    ):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
            mask = torch.cat([torch.ones((mask.shape[0], 1), dtype=mask.dtype), mask], dim=1)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        target_mask = mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        counts = target_mask.sum(1)
        mean_nll = (nll * target_mask).sum(1) / counts.clamp(min=1.0)
        for value, count in zip(mean_nll.tolist(), counts.tolist()):
            result.append(math.exp(value) if count > 0 else float("nan"))
    return result


def perplexity(texts: Sequence[str], model: torch.nn.Module, tokenizer, **kwargs) -> float:
    """Mean over texts of :func:`per_text_perplexity` (texts with no scored token are left out)."""
    values = [v for v in per_text_perplexity(texts, model, tokenizer, **kwargs) if not math.isnan(v)]
    if not values:
        raise ValueError("No text has a token to score (all are empty); perplexity is undefined.")
    return sum(values) / len(values)


class LinearTextClassifier(torch.nn.Module):
    """Multinomial logistic regression on standardised text features.

    ``classes`` maps output index -> class name. ``forward(features [B, H]) -> logits [B, C]``.
    """

    def __init__(self, classes: Sequence[str], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.classes = list(classes)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.shape[-1], len(self.classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in self(features).argmax(-1).tolist()]


def train_text_classifier(
    features: torch.Tensor, labels: Sequence[str], *, weight_decay: float = 1e-3, max_iter: int = 200
) -> LinearTextClassifier:
    """Fit a :class:`LinearTextClassifier` on ``features`` [N, H] with string ``labels`` (full-batch L-BFGS).

    Plain torch rather than scikit-learn, so the classifier adds no dependency; deterministic for
    fixed inputs (zero-initialised weights).
    """
    features = torch.as_tensor(features).float()
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise ValueError(
            f"features must be [num_texts, dim] with one label per row; got {tuple(features.shape)} and {len(labels)} labels."
        )
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"A classifier needs at least 2 classes in the training labels, got {classes}.")
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([index[label] for label in labels])
    classifier = LinearTextClassifier(classes, features.mean(0), features.std(0).clamp(min=1e-6))
    torch.nn.init.zeros_(classifier.linear.weight)
    torch.nn.init.zeros_(classifier.linear.bias)
    optimizer = torch.optim.LBFGS(classifier.linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(features), targets)
        loss = loss + weight_decay * classifier.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier.eval()


def class_accuracy(classifier: LinearTextClassifier, features: torch.Tensor, target_class: str) -> float:
    """Share of rows of ``features`` [N, H] that ``classifier`` assigns to ``target_class``."""
    if target_class not in classifier.classes:
        raise ValueError(f"Unknown class {target_class!r}; the classifier knows {classifier.classes}.")
    predictions = classifier.predict(torch.as_tensor(features))
    if not predictions:
        raise ValueError("features is empty; pass at least one sample.")
    return sum(p == target_class for p in predictions) / len(predictions)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    _check_texts(hypotheses, "hypotheses")
    if len(hypotheses) != len(references):
        raise ValueError(f"Got {len(hypotheses)} hypotheses but {len(references)} references; they must pair up.")


def reconstruction_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of reconstructions against their inputs."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def _normalize_space(text: str) -> str:
    return " ".join(text.split())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of reconstructions equal to their input (whitespace runs collapsed, case kept)."""
    _check_pairs(hypotheses, references)
    return sum(_normalize_space(h) == _normalize_space(r) for h, r in zip(hypotheses, references)) / len(hypotheses)
