"""Text-to-text: the source-conditioned denoiser, its training path, the latent cache's source states,
the pipeline's source_texts / num_samples_per_source / MBR, save/load and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_text_autoencoder
from latentlm.diffusion import LatentDenoiser, diffusion_loss, make_noise_scheduler
from latentlm.pipelines.mbr import mbr_select, rouge_l, similarity

SOURCES = ["the cat sat on the mat", "my brother found a small boat at the lake"]


def _denoiser(**kwargs) -> LatentDenoiser:
    torch.manual_seed(0)
    return LatentDenoiser.from_size("tiny", num_latents=4, latent_dim=8, dropout=0.0, **kwargs).eval()


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def test_denoiser_without_cross_attention_is_unchanged_and_refuses_a_source():
    plain = _denoiser()
    assert plain.config.cross_attention_dim is None
    assert not any("cross" in name or "context" in name for name, _ in plain.named_parameters())
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="trained without a source"):
        plain(x, 10, encoder_hidden_states=torch.randn(2, 3, 16))


def test_cross_attention_reads_the_source_and_masks_padding():
    model = _denoiser(cross_attention_dim=16)
    for block in model.blocks:
        torch.nn.init.normal_(block.to_out_cross.weight, std=0.5)
    torch.nn.init.normal_(model.output_proj.weight, std=0.5)
    x, t = torch.randn(2, 4, 8), torch.tensor([10, 500])
    states = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = model(x, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample

    # padding does not matter
    changed = states.clone()
    changed[0, 3:] = 100.0
    same = model(x, t, encoder_hidden_states=changed, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, same)
    # the source does
    other = model(x, t, encoder_hidden_states=torch.randn(2, 5, 16), encoder_attention_mask=mask).sample
    assert not torch.allclose(out, other)
    # an all-zero mask row is the null context, the same as no source at all
    no_source = model(x, t).sample
    masked = model(x, t, encoder_hidden_states=states, encoder_attention_mask=torch.zeros_like(mask)).sample
    torch.testing.assert_close(no_source, masked)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        model(x, t, encoder_hidden_states=torch.randn(2, 5, 12))


def test_new_cross_attention_starts_as_the_model_without_it():
    plain, crossed = _denoiser(), _denoiser(cross_attention_dim=16)
    crossed.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.normal_(plain.output_proj.weight, std=0.5)
    torch.nn.init.normal_(plain.out_modulation.weight, std=0.5)
    crossed.output_proj.load_state_dict(plain.output_proj.state_dict())
    crossed.out_modulation.load_state_dict(plain.out_modulation.state_dict())
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(
        plain(x, 100).sample, crossed(x, 100, encoder_hidden_states=torch.randn(2, 3, 16)).sample
    )


def test_diffusion_loss_needs_and_drops_sources():
    model = _denoiser(cross_attention_dim=16).train()
    scheduler = make_noise_scheduler(num_train_timesteps=1000)
    z0, states = torch.randn(4, 4, 8), torch.randn(4, 3, 16)
    with pytest.raises(ValueError, match="no source states"):
        diffusion_loss(model, scheduler, z0)
    loss = diffusion_loss(
        model,
        scheduler,
        z0,
        encoder_hidden_states=states,
        source_dropout_prob=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert model.context_proj.weight.grad is not None
    with pytest.raises(ValueError, match="source_dropout_prob"):
        diffusion_loss(model, scheduler, z0, encoder_hidden_states=states, source_dropout_prob=1.5)
    with pytest.raises(ValueError, match="no cross-attention"):
        diffusion_loss(_denoiser(), scheduler, z0, encoder_hidden_states=states)


# ------------------------------------------------------------------------------------------------
# MBR
# ------------------------------------------------------------------------------------------------


def test_mbr_picks_the_consensus_candidate():
    group_a = ["the cat sat on the mat", "a dog ran far away", "the cat sat on a mat"]
    group_b = ["one two three four", "one two three five", "one two three four"]
    for metric in ("bleu", "rouge_l"):
        chosen = mbr_select(group_a + group_b, 3, metric)
        assert chosen[0] in (0, 2) and chosen[1] in (3, 5)
    assert mbr_select(["x", "y"], 1) == [0, 1]
    assert rouge_l("a b c", "a b c") == pytest.approx(100.0)
    assert similarity("a b c d", "a b c d", "bleu") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="MBR metric"):
        mbr_select(group_a, 3, "meteor")


# ------------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------------


def test_pipeline_generates_per_source_with_guidance_and_mbr(tiny_bart_dir):
    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    kwargs = dict(num_inference_steps=3, decode_kwargs={"num_beams": 1, "max_length": 8})
    out = pipe(source_texts=SOURCES, num_samples_per_source=2, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(out.texts) == 2 and all(len(group) == 2 for group in out.texts)
    assert out.latents.shape == (4, 4, 8)

    # the source changes the sample (same noise, other source)
    a = pipe(source_texts=[SOURCES[0]], generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
    b = pipe(source_texts=[SOURCES[1]], generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
    assert not torch.allclose(a.latents, b.latents)

    # guidance on the source, with and without a class, and MBR-3
    guided = pipe(source_texts=SOURCES, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **kwargs)
    assert [len(group) for group in guided.texts] == [1, 1]
    both = pipe(
        source_texts=SOURCES,
        class_labels="odd",
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert not torch.allclose(both.latents, guided.latents)
    mbr = pipe(source_texts=SOURCES, mbr_candidates=3, generator=torch.Generator().manual_seed(0), **kwargs)
    assert [len(group) for group in mbr.texts] == [1, 1] and mbr.latents.shape == (2, 4, 8)


def test_pipeline_source_errors(tiny_bart_dir):
    source_pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    plain_pipe = make_tiny_pipeline(tiny_bart_dir)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="pass source_texts"):
        source_pipe(**kwargs)
    with pytest.raises(ValueError, match="trained without a source"):
        plain_pipe(source_texts=SOURCES, **kwargs)
    with pytest.raises(ValueError, match="source_texts\\[1\\] is an empty string"):
        source_pipe(source_texts=["ok", "  "], **kwargs)
    with pytest.raises(ValueError, match="source_texts is empty"):
        source_pipe(source_texts=[], **kwargs)
    with pytest.raises(ValueError, match="num_samples_per_source instead"):
        source_pipe(source_texts=SOURCES, num_samples=4, **kwargs)
    with pytest.raises(ValueError, match="mbr_metric"):
        source_pipe(source_texts=SOURCES, mbr_candidates=2, mbr_metric="meteor", num_inference_steps=2)
    with pytest.raises(ValueError, match="longer than the encoder reads"):
        source_pipe(source_texts=["word " * 400], **kwargs)


def test_pipeline_with_source_saves_and_loads(tiny_bart_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from latentlm.pipelines import LatentTextDiffusionPipeline

    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    kwargs = dict(num_inference_steps=3, output_type="latent")
    expected = pipe(source_texts=SOURCES, generator=torch.Generator().manual_seed(0), **kwargs).latents
    pipe.save_pretrained(tmp_path / "pipe")
    for loader in (
        lambda: LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe"),
        lambda: DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True),
    ):
        loaded = loader()
        assert loaded.denoiser.config.cross_attention_dim == pipe.denoiser.config.cross_attention_dim
        got = loaded(source_texts=SOURCES, generator=torch.Generator().manual_seed(0), **kwargs).latents
        torch.testing.assert_close(got, expected)


def test_sample_texts_rows_carry_their_source(tiny_bart_dir):
    from latentlm.sampling import sample_texts

    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    rows = sample_texts(
        pipe,
        2,
        source_texts=SOURCES,
        num_inference_steps=2,
        batch_size=2,
        decode_kwargs={"num_beams": 1, "max_length": 8},
    )
    assert [(row["source"], row["index"]) for row in rows] == [
        (SOURCES[0], 0),
        (SOURCES[0], 1),
        (SOURCES[1], 0),
        (SOURCES[1], 1),
    ]
    assert [row["seed"] for row in rows] == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------------
# Latent cache and stage 2
# ------------------------------------------------------------------------------------------------


def test_latent_cache_stores_source_states(tiny_bart_dir, tmp_path):
    from latentlm.training.latent_cache import build_latent_cache

    model = make_tiny_text_autoencoder(tiny_bart_dir).eval()
    texts = ["the cat sat", "a dog ran far away today", "birds fly"]
    sources = ["cat", "dog ran", "some birds were flying high"]
    plain = build_latent_cache(model, texts, tmp_path, show_progress=False)
    cache = build_latent_cache(model, texts, tmp_path, sources=sources, show_progress=False)
    assert cache.path != plain.path and plain.source_states is None
    assert cache.source_dim == model.autoencoder.config.d_model
    states, mask = cache.source_batch([0, 2])
    expected, expected_mask = model.encode_sources([sources[0], sources[2]])
    assert mask.tolist() == expected_mask.tolist()
    keep = mask.bool()
    torch.testing.assert_close(states[keep], expected.float()[keep], atol=2e-2, rtol=1e-2)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["has_sources"] is True
    assert np.load(cache.path / "source_lengths.npy").tolist() == [
        int(m.sum()) for m in model.encode_sources(sources)[1]
    ]
    with pytest.raises(ValueError, match="one source per text"):
        build_latent_cache(model, texts, tmp_path, sources=sources[:2], show_progress=False)


@pytest.fixture
def pairs_jsonl(tmp_path):
    """train/validation jsonl with ``source`` (the words reversed) and ``target`` columns."""
    from conftest import SENTENCES

    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, rows in (("train", SENTENCES[:32]), ("validation", SENTENCES[32:])):
        with open(folder / f"{split}.jsonl", "w") as f:
            for text in rows:
                f.write(json.dumps({"source": " ".join(reversed(text.split())), "target": text}) + "\n")
    return folder


def _config(tmp_path, data_path, **data):
    from latentlm.config import load_config

    return load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"path": str(data_path), "source_column": "source", "target_column": "target", **data},
            "diffusion": dict(
                denoiser_size="tiny",
                sample_every=10,
                save_every=1000,
                num_samples_per_class=2,
                sample_inference_steps=2,
                source_dropout_prob=0.2,
                optimizer=dict(learning_rate=3e-3, batch_size=8, max_steps=20, warmup_steps=2),
            ),
            "tracking": {"enabled": False},
        }
    )


def test_stage2_trains_a_text_to_text_denoiser_and_the_pipeline_samples_it(tmp_path, tiny_bart_dir, pairs_jsonl):
    from latentlm.training.run import build_pipeline, write_pipeline
    from latentlm.training.stages.diffusion import train_diffusion

    autoencoder = tmp_path / "stage1" / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(autoencoder)
    config = _config(tmp_path, pairs_jsonl)
    assert config.data.text_column == "target"
    final = train_diffusion(config, autoencoder)
    denoiser = LatentDenoiser.from_pretrained(final / "denoiser")
    assert denoiser.config.cross_attention_dim == 32  # the tiny BART's d_model
    history = json.loads((tmp_path / "run" / "diffusion_history.json").read_text())
    samples = [row for e in history["history"] for row in e.get("samples", [])]
    assert samples and all(row["source"] for row in samples)

    pipe = build_pipeline(autoencoder, final)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(source_texts=SOURCES, num_inference_steps=2, decode_kwargs={"num_beams": 1, "max_length": 8})
    assert len(out.texts) == 2
    # a run told to save the context n-gram ban, resuming a decoder that reads no context: named, nothing saved
    tuning = {"enabled": True, "latent_source": "denoiser", "read_context": True}
    tuning["generate_kwargs"] = {"encoder_no_repeat_ngram_size": 4}
    banned = dataclasses.replace(config, decoder_tuning=dataclasses.replace(config.decoder_tuning, **tuning))
    with pytest.raises(ValueError, match="decoder_tuning.generate_kwargs bans .* tuned without read_context"):
        write_pipeline(banned, autoencoder, final, tmp_path / "pipeline", 1.0)
    gaps = dataclasses.replace(banned.autoencoder, infill_generate_kwargs=tuning.pop("generate_kwargs"))
    banned = dataclasses.replace(
        banned, autoencoder=gaps, decoder_tuning=dataclasses.replace(config.decoder_tuning, **tuning)
    )
    with pytest.raises(ValueError, match="autoencoder.infill_generate_kwargs bans .* tuned without read_context"):
        write_pipeline(banned, autoencoder, final, tmp_path / "pipeline", 1.0)
    assert not (tmp_path / "pipeline").exists()


def test_stage2_source_data_errors(tmp_path, tiny_bart_dir, pairs_jsonl):
    from latentlm.config import load_config
    from latentlm.training.stages.diffusion import train_diffusion

    autoencoder = tmp_path / "stage1" / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(autoencoder)
    with pytest.raises(ValueError, match="Source column 'src' not found"):
        train_diffusion(_config(tmp_path, pairs_jsonl, source_column="src"), autoencoder)
    rows = [json.loads(line) for line in (pairs_jsonl / "train.jsonl").read_text().splitlines()]
    rows[3]["source"] = " "
    (pairs_jsonl / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="empty or non-string texts in column 'source'"):
        train_diffusion(_config(tmp_path, pairs_jsonl), autoencoder)
    with pytest.raises(ValueError, match="set only one of them"):
        load_config({"data": {"path": "x", "text_column": "a", "target_column": "b"}})


# ------------------------------------------------------------------------------------------------
# CLI, evaluation, MLflow pyfunc
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def source_pipeline_dir(tiny_bart_dir, tmp_path):
    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    pipe.register_to_config(decode_kwargs={"num_beams": 1, "max_length": 8})
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_cli_samples_from_sources(source_pipeline_dir, tmp_path, capsys):
    from latentlm.cli import main

    main(["sample", "--pipeline", str(source_pipeline_dir), "--source", SOURCES[0], "--source", SOURCES[1],
          "-n", "2", "--steps", "2", "--guidance", "2", "--mbr", "2"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["source"] for row in rows] == [SOURCES[0], SOURCES[0], SOURCES[1], SOURCES[1]]
    (tmp_path / "sources.txt").write_text("\n".join(SOURCES) + "\n")
    main(["sample", "--pipeline", str(source_pipeline_dir), "--sources", str(tmp_path / "sources.txt"), "--steps", "2",
          "--out", str(tmp_path / "out.jsonl")])  # fmt: skip
    assert [json.loads(line)["source"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == SOURCES
    with pytest.raises(ValueError, match="pass source_texts"):
        main(["sample", "--pipeline", str(source_pipeline_dir), "-n", "1", "--steps", "2"])


def test_evaluate_text_to_text_scores_model_copy_and_reconstruction(
    source_pipeline_dir, pairs_jsonl, tmp_path, capsys, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from latentlm.cli import main
    from latentlm.evaluation.text_to_text import corpus_bleu, self_bleu

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)

    main(["evaluate", "--pipeline", str(source_pipeline_dir), "--references", str(pairs_jsonl / "validation.jsonl"),
          "--target-column", "target", "-n", "3", "--samples-per-source", "2", "--steps", "2",
          "--out", str(tmp_path / "eval")])  # fmt: skip
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(result["rows"]) == {"model", "copy source", "autoencoder reconstruction"}
    assert result["num_sources"] == 3 and result["bertscore_model"].startswith("all-MiniLM")
    for row in result["rows"].values():
        assert 0 <= row["bleu"] <= 100 and 0 <= row["rouge_l"] <= 100 and row["bertscore_f1"] is not None
    assert result["rows"]["model"]["self_bleu"] is not None
    assert "| copy source |" in capsys.readouterr().out
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(row["target"] and row["source"] for row in samples)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("latentlm").experiment_id])
    assert run.data.metrics["model/bleu"] == pytest.approx(result["rows"]["model"]["bleu"])
    assert "copy_source/rouge_l" in run.data.metrics
    # the metrics themselves
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert self_bleu([["a b c d", "a b c d"], ["x"]]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="has no column 'mr'"):
        main(["evaluate", "--pipeline", str(source_pipeline_dir), "--references", str(pairs_jsonl / "validation.jsonl"),
              "--source-column", "mr", "-n", "2", "--steps", "2", "--bert-model", "none"])  # fmt: skip


def test_pyfunc_model_takes_a_source_column(source_pipeline_dir):
    import pandas as pd

    from latentlm.mlflow.pyfunc import PipelinePyfunc

    model = PipelinePyfunc(source_pipeline_dir)
    out = model.predict(pd.DataFrame({"source": SOURCES, "num_samples": [1, 2]}), params={"num_inference_steps": 2})
    assert list(out.columns) == ["class", "text", "row", "source"]
    assert out["source"].tolist() == [SOURCES[0], SOURCES[1], SOURCES[1]]
    with pytest.raises(ValueError, match="pass source_texts"):
        model.predict(pd.DataFrame({"num_samples": [1]}), params={"num_inference_steps": 2})


def test_config_and_denoiser_checks_for_sources():
    from latentlm.config import load_config
    from latentlm.training.stages.diffusion import build_denoiser

    with pytest.raises(ValueError, match="source_dropout_prob must lie in"):
        load_config({"diffusion": {"source_dropout_prob": 1.5}})
    with pytest.raises(ValueError, match="both 'x'"):
        load_config({"data": {"path": "p", "source_column": "x", "target_column": "x"}})
    config = load_config({"diffusion": {"denoiser_size": "tiny", "denoiser": {"cross_attention_dim": 7}}})
    with pytest.raises(ValueError, match="cross_attention_dim=7 but the source states have width 32"):
        build_denoiser(config, 4, 8, [], cross_attention_dim=32)
    with pytest.raises(ValueError, match="no data.source_column"):
        build_denoiser(config, 4, 8, [])
    ok = load_config({"diffusion": {"denoiser_size": "tiny"}})
    assert build_denoiser(ok, 4, 8, [], cross_attention_dim=32).config.cross_attention_dim == 32
    assert build_denoiser(ok, 4, 8, []).config.cross_attention_dim is None


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "unipc", "euler"])
def test_every_scheduler_samples_from_sources(tiny_bart_dir, name):
    from latentlm.pipelines import make_scheduler

    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    out = pipe(
        source_texts=SOURCES,
        guidance_scale=2.0,
        num_inference_steps=4,
        scheduler=make_scheduler(pipe.scheduler, name),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert out.latents.shape == (2, 4, 8) and torch.isfinite(out.latents).all()
