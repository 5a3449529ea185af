"""The on-disk cache of frozen-encoder states: exact per text, reused by key, and compressed into latents."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, make_tiny_text_autoencoder
from test_causal_backbone import make_causal_autoencoder, tiny_llama_dir  # noqa: F401  (fixture)

from latentlm.training.encoder_cache import EncoderCache, build_encoder_cache
from latentlm.training.latent_cache import build_latent_cache

TEXTS = SENTENCES[:12]


@pytest.fixture(params=["bart", "llama"])
def autoencoder(request, tiny_bart_dir, tiny_llama_dir):  # noqa: F811
    if request.param == "bart":
        return make_tiny_text_autoencoder(tiny_bart_dir, max_length=8).eval()
    return make_causal_autoencoder(tiny_llama_dir, max_length=6).eval()


def _never(*args, **kwargs):
    raise AssertionError("the encoder ran although its states were cached")


def test_cache_holds_each_texts_states_and_is_reused_by_its_key(autoencoder, tmp_path, monkeypatch):
    cache = build_encoder_cache(autoencoder, TEXTS, tmp_path, show_progress=False)
    ids = autoencoder.token_ids(TEXTS)
    assert len(cache) == len(TEXTS) and cache.lengths == tuple(len(i) for i in ids)
    assert any(len(i) == autoencoder.max_length for i in ids)  # some texts are cut at max_length
    hidden, mask, batch_ids = cache.batch([3, 0, 7])
    for row, i in enumerate([3, 0, 7]):
        n = len(ids[i])
        with torch.no_grad():
            alone = autoencoder.encoder_states(torch.tensor([ids[i]]), torch.ones(1, n, dtype=torch.long))[0]
        torch.testing.assert_close(hidden[row, :n], alone, atol=1e-5, rtol=1e-5)
        assert mask[row].sum() == n and batch_ids[row, :n].tolist() == ids[i]
        assert not hidden[row, n:].any() and not batch_ids[row, n:].any()

    monkeypatch.setattr(type(autoencoder), "encoder_states", _never)
    again = build_encoder_cache(autoencoder, TEXTS, tmp_path, show_progress=False)
    assert again.path == cache.path
    assert len(list(tmp_path.iterdir())) == 1
    # other texts or another precision are other states: a new folder, never the old one
    monkeypatch.undo()
    build_encoder_cache(autoencoder, TEXTS[:-1], tmp_path, show_progress=False)
    build_encoder_cache(autoencoder, TEXTS, tmp_path, mixed_precision="bf16", show_progress=False)
    assert len(list(tmp_path.iterdir())) == 3


def test_latent_cache_compresses_the_cached_states_without_the_encoder(autoencoder, tmp_path, monkeypatch):
    encoder_dir = tmp_path / "encoder_cache"
    build_encoder_cache(autoencoder, TEXTS, encoder_dir, show_progress=False)
    monkeypatch.setattr(type(autoencoder), "encoder_states", _never)
    import latentlm.autoencoder.text_codec

    monkeypatch.setattr(latentlm.autoencoder.text_codec, "encoder_hidden_states", _never)
    cache = build_latent_cache(autoencoder, TEXTS, tmp_path / "latents", encoder_cache_dir=encoder_dir, batch_size=5)
    monkeypatch.undo()
    torch.testing.assert_close(torch.from_numpy(cache.latents[:]), autoencoder.encode(TEXTS), atol=1e-5, rtol=1e-5)
    # the same latents' cache key either way: a later stage built without the encoder cache finds it
    assert build_latent_cache(autoencoder, TEXTS, tmp_path / "latents").path == cache.path


def test_a_damaged_cache_is_named_and_bad_input_is_refused(tiny_text_autoencoder, tmp_path):
    cache = build_encoder_cache(tiny_text_autoencoder, TEXTS, tmp_path, show_progress=False)
    meta = json.loads((cache.path / "meta.json").read_text())
    (cache.path / "meta.json").write_text(json.dumps({**meta, "num_texts": 5}))
    with pytest.raises(ValueError, match="is damaged.*Delete the folder"):
        EncoderCache.open(cache.path)
    with pytest.raises(FileNotFoundError, match="not an encoder cache folder"):
        EncoderCache.open(tmp_path)
    with pytest.raises(ValueError, match="at least one training text"):
        build_encoder_cache(tiny_text_autoencoder, [], tmp_path)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        build_encoder_cache(tiny_text_autoencoder, TEXTS, tmp_path, mixed_precision="fp8")
