"""Stage 1 training loop, data loading and bad input, on tiny offline models."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from conftest import SENTENCES
from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from safetensors.torch import load_file

from latentlm.config import AutoencoderModelConfig, DataConfig, load_config
from latentlm.data.loading import count_truncated, load_text_dataset, load_texts
from latentlm.evaluation.reconstruction import posterior_spread
from latentlm.training.checkpoints import StaleCheckpointsError
from latentlm.training.loop import NonFiniteLossError
from latentlm.training.stages.autoencoder import load_initial_autoencoder, train_autoencoder
from latentlm.training.stages.decoder_tuning import decoder_tuning_config


def tiny_config(tmp_path, data_path, backbone, **autoencoder):
    """The ``autoencoder:`` keys, with ``model`` settings given by name (``latent_dim=16``)."""
    model = dict(
        backbone=backbone,
        max_length=16,
        decoder="frozen",
        num_latents=4,
        latent_dim=8,
        num_compression_layers=1,
        num_reconstruction_layers=1,
        head_dim=16,
    )
    ae = dict(
        model=model,
        eval_every=0,
        save_every=1000,
        log_every=5,
        eval_num_beams=1,
        num_eval_examples=4,
        optimizer=dict(learning_rate=3e-3, batch_size=8, max_steps=20, warmup_steps=2, lr_schedule="linear"),
    )
    for key, value in autoencoder.items():
        if key == "optimizer":
            ae["optimizer"].update(value)
        elif key in {f.name for f in dataclasses.fields(AutoencoderModelConfig)}:
            model[key] = value
        else:
            ae[key] = value
    return load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"path": str(data_path), "max_eval_samples": 8},
            "autoencoder": ae,
            "tracking": {"enabled": False},
        }
    )


def _history(run_dir):
    return json.loads((run_dir / "autoencoder_history.json").read_text())


def test_short_run_lowers_loss_and_logs_to_mlflow(tmp_path, snippets_jsonl, tiny_bart_dir):
    import mlflow

    config = tiny_config(
        tmp_path, snippets_jsonl, tiny_bart_dir, eval_every=10, decoder="full", optimizer=dict(max_steps=30)
    )
    config.tracking.enabled = True
    config.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config.tracking.experiment_name = "stage1-test"
    final = train_autoencoder(config)
    assert final == tmp_path / "run" / "autoencoder"
    model = TextAutoencoder.from_pretrained(final)
    assert model.encode(SENTENCES[:2]).shape == (2, 4, 8)
    history = _history(tmp_path / "run")
    assert [h["step"] for h in history["history"]] == [10, 20, 30]
    assert all(0.0 <= h["bleu"] <= 100.0 for h in history["history"])

    client = mlflow.MlflowClient(tracking_uri=config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("stage1-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["autoencoder.model.num_latents"] == "4"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses  # the loss goes down
    assert len(client.get_metric_history(run.info.run_id, "eval/bleu")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "reconstructions" in artifacts


def test_variational_run_trains_the_posterior_and_reports_its_spread(tmp_path, snippets_jsonl, tiny_bart_dir):
    # dropout: the spread is measured as the model encodes, in eval mode
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, variational=True, kl_weight=0.05, dropout=0.1)
    model = TextAutoencoder.from_pretrained(train_autoencoder(config))
    assert model.autoencoder.config.variational and model.kl_weight == 0.05
    # the posterior's spread has moved from its initial std 0.5, and the evaluation reports it
    assert model.autoencoder.to_log_variance.bias.sub(math.log(0.25)).abs().max() > 1e-4
    (final,) = [h for h in _history(tmp_path / "run")["history"] if h["step"] == 20]
    val_texts = load_texts(config.data, config.data.validation_split, config.data.max_eval_samples)
    assert final["posterior_std"] == pytest.approx(posterior_spread(model, val_texts), rel=1e-4)
    assert 0.3 < final["posterior_std"] < 0.7
    # the decoder tuning freezes the posterior, so its KL (a constant there) is left out
    tuning = load_initial_autoencoder(decoder_tuning_config(config, tmp_path / "run" / "autoencoder"))
    assert tuning.kl_weight == 0.0 and not tuning.autoencoder.to_log_variance.bias.requires_grad
    # a plain autoencoder cannot be continued as a variational one: the mismatch is named
    plain = tiny_config(tmp_path / "plain", snippets_jsonl, tiny_bart_dir, optimizer=dict(max_steps=2))
    config.autoencoder.init_from = str(train_autoencoder(plain))
    with pytest.raises(ValueError, match="was built with variational=False"):
        load_initial_autoencoder(config.autoencoder)


class KilledAt(Exception):
    pass


class KillingTracker:
    """A tracker that "kills" the run (raises) when asked to log the metrics of step `kill_step`."""

    def __init__(self, kill_step: int):
        self.kill_step = kill_step

    def log_metrics(self, metrics, step):
        if step >= self.kill_step:
            raise KilledAt(step)

    def log_params(self, *a, **k): ...
    def log_table(self, *a, **k): ...
    def log_artifact(self, *a, **k): ...


def test_resume_after_kill_equals_uninterrupted(tmp_path, snippets_jsonl, tiny_bert2bert_dir):
    # LoRA BERT2BERT: trainable cross-attention, adapters and optimizer state must all be restored;
    # length-grouped batches and the latent noise are drawn by step like random ones.
    kwargs = dict(
        decoder="lora",
        lora_r=4,
        save_every=5,
        log_every=1,
        group_by_length=True,
        latent_noise_std=0.3,
        optimizer=dict(max_steps=12),
    )
    full = tiny_config(tmp_path / "a", snippets_jsonl, tiny_bert2bert_dir, **kwargs)
    train_autoencoder(full)

    killed = tiny_config(tmp_path / "b", snippets_jsonl, tiny_bert2bert_dir, **kwargs)
    with pytest.raises(KilledAt):  # killed after step 7; the last checkpoint is from step 5
        train_autoencoder(killed, tracker=KillingTracker(kill_step=7))
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "run" / "autoencoder_training" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000005"]
    assert not (tmp_path / "b" / "run" / "autoencoder").exists()
    train_autoencoder(killed, resume=True)

    for sub in ("autoencoder/diffusion_pytorch_model.safetensors", "language_model/adapter_model.safetensors"):
        a = load_file(str(tmp_path / "a" / "run" / "autoencoder" / sub))
        b = load_file(str(tmp_path / "b" / "run" / "autoencoder" / sub))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=f"{sub}:{key}")


def test_bf16_autocast_run(tmp_path, snippets_jsonl, tiny_t5_dir):
    config = tiny_config(
        tmp_path,
        snippets_jsonl,
        tiny_t5_dir,
        mixed_precision="bf16",
        decoder="lora",
        lora_r=2,
        context_positions=-1,
        latent_noise_std=0.5,  # unnormalized latents: the noise is added, not projected
        optimizer=dict(max_steps=3),
    )
    model = TextAutoencoder.from_pretrained(train_autoencoder(config))
    assert torch.isfinite(model.encode(SENTENCES[:2])).all()
    assert not model.autoencoder.config.normalize_latents  # LD4LG default for T5
    assert model.autoencoder.config.context_positions == 16  # -1: one position per token of max_length


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_trains_in_bf16_only_where_it_is_native(
    tmp_path, snippets_jsonl, tiny_t5_dir, monkeypatch, native
):
    from latentlm.training import precision as training

    monkeypatch.setattr(training, "has_native_bf16", lambda device: native)
    config = tiny_config(tmp_path, snippets_jsonl, tiny_t5_dir, mixed_precision="auto", optimizer=dict(max_steps=2))
    train_autoencoder(config)
    history = json.loads((tmp_path / "run" / "autoencoder_history.json").read_text())
    assert history["mixed_precision"] == ("bf16" if native else "no")


def test_init_from_with_frozen_compression_keeps_every_latent(tmp_path, snippets_jsonl, tiny_bart_dir):
    # Fine-tune the decoder side of a trained autoencoder (here on noisy latents) without moving its
    # latents, so a denoiser trained on them still fits the new decoder.
    kwargs = dict(decoder="lora", lora={"r": 4}, optimizer=dict(max_steps=6))
    first = train_autoencoder(tiny_config(tmp_path / "a", snippets_jsonl, tiny_bart_dir, **kwargs))
    frozen = train_autoencoder(
        tiny_config(
            tmp_path / "b",
            snippets_jsonl,
            tiny_bart_dir,
            init_from=str(first),
            freeze_compression=True,
            latent_noise_std=0.5,
            **kwargs,
        )
    )
    free = train_autoencoder(tiny_config(tmp_path / "c", snippets_jsonl, tiny_bart_dir, init_from=str(first), **kwargs))

    models = {name: TextAutoencoder.from_pretrained(path) for name, path in (("a", first), ("b", frozen), ("c", free))}
    assert models["b"].latent_noise_std == 0.5 and models["c"].latent_noise_std == 0.0
    latents = {name: model.encode(SENTENCES[:4]) for name, model in models.items()}
    torch.testing.assert_close(latents["b"], latents["a"], atol=0, rtol=0)
    assert not torch.allclose(latents["c"], latents["a"])  # without freezing, compression trains on

    weights = {
        name: load_file(str(path / "autoencoder" / "diffusion_pytorch_model.safetensors"))
        for name, path in (("a", first), ("b", frozen))
    }
    frozen_ids = {id(p) for p in models["a"].autoencoder.compression_parameters()}
    compression = {name for name, p in models["a"].autoencoder.named_parameters() if id(p) in frozen_ids}
    assert compression and len(compression) < len(weights["a"])
    for key in weights["a"]:
        same = torch.equal(weights["a"][key], weights["b"][key])
        assert same == (key in compression), key  # the reconstruction side trained on from first's weights
    adapters = [load_file(str(path / "language_model" / "adapter_model.safetensors")) for path in (first, frozen)]
    assert any(not torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])


def test_init_from_refuses_another_architecture_and_freezing_needs_it(tmp_path, snippets_jsonl, tiny_bart_dir):
    first = train_autoencoder(tiny_config(tmp_path / "a", snippets_jsonl, tiny_bart_dir, optimizer=dict(max_steps=1)))
    wider = tiny_config(tmp_path / "b", snippets_jsonl, tiny_bart_dir, init_from=str(first), latent_dim=16)
    with pytest.raises(ValueError, match=r"was built with latent_dim=8, but the config asks for latent_dim=16"):
        train_autoencoder(wider)
    with pytest.raises(ValueError, match="freeze_compression keeps the latents of a trained autoencoder"):
        tiny_config(tmp_path / "c", snippets_jsonl, tiny_bart_dir, freeze_compression=True)


def test_resume_with_mismatched_config_fails(tmp_path, snippets_jsonl, tiny_bart_dir):
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, save_every=2, optimizer=dict(max_steps=2))
    train_autoencoder(config)
    bigger = tiny_config(
        tmp_path, snippets_jsonl, tiny_bart_dir, save_every=2, latent_dim=16, optimizer=dict(max_steps=4)
    )
    # The checkpoint's fingerprint names the config it was written under: refused before loading.
    with pytest.raises(StaleCheckpointsError, match="another config or seed"):
        train_autoencoder(bigger, resume=True)


def test_the_decoding_of_gaps_leaves_a_checkpoint_s_fingerprint_as_it_was():
    import dataclasses

    from latentlm.config import AutoencoderTrainingConfig
    from latentlm.training.checkpoints import run_fingerprint

    config = AutoencoderTrainingConfig()
    before = {k: v for k, v in dataclasses.asdict(config).items() if k != "infill_generate_kwargs"}  # older configs
    gaps = dataclasses.replace(config, infill_generate_kwargs={"num_beams": 4})
    assert run_fingerprint(config) == run_fingerprint(before) == run_fingerprint(gaps)
    assert run_fingerprint(dataclasses.replace(config, latent_noise_std=0.5)) != run_fingerprint(config)


def test_non_finite_loss_stops(tmp_path, snippets_jsonl, tiny_bart_dir):
    config = tiny_config(
        tmp_path, snippets_jsonl, tiny_bart_dir, optimizer=dict(learning_rate=1e30, warmup_steps=0, max_grad_norm=0.0)
    )
    with pytest.raises(NonFiniteLossError, match="learning_rate"):
        train_autoencoder(config)


@pytest.mark.slow
def test_tiny_model_overfits_eight_sentences(tmp_path, tiny_bart_dir):
    data = tmp_path / "eight.jsonl"
    eight = SENTENCES[:8]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in eight))
    config = tiny_config(
        tmp_path,
        data,
        tiny_bart_dir,
        decoder="full",
        num_latents=8,
        latent_dim=16,
        num_compression_layers=2,
        eval_num_beams=1,
        optimizer=dict(
            learning_rate=5e-3, batch_size=8, max_steps=120, warmup_steps=10, lr_schedule="constant", weight_decay=0.0
        ),
    )
    config.data.validation_split = "train"  # evaluate on the training sentences themselves
    final = train_autoencoder(config)
    model = TextAutoencoder.from_pretrained(final)
    assert (
        model.decode(
            model.encode(eight),
            num_beams=1,
            no_repeat_ngram_size=0,
            repetition_penalty=1.0,
            min_length=0,
            max_length=16,
        )
        == eight
    )
    assert _history(tmp_path / "run")["history"][-1]["exact_match"] == 1.0


# ---------------------------------------------------------------- data and bad input
def test_load_local_formats(tmp_path, snippets_jsonl):
    ds = load_text_dataset(DataConfig(path=str(snippets_jsonl)), "train")
    assert len(ds) == 32 and ds[0]["text"] == SENTENCES[0]
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\nhello world,a\nthe cat sat,b\n")
    assert load_text_dataset(DataConfig(path=str(csv)), "train")["text"] == ["hello world", "the cat sat"]
    txt = tmp_path / "t.txt"
    txt.write_text("line one\nline two\nline three\n")
    cfg = DataConfig(path=str(txt))
    assert load_text_dataset(cfg, "train[:2]")["text"] == ["line one", "line two"]
    assert load_text_dataset(cfg, "train[-1:]")["text"] == ["line three"]
    pq = tmp_path / "t.parquet"
    load_text_dataset(DataConfig(path=str(csv)), "train").to_parquet(str(pq))
    assert len(load_text_dataset(DataConfig(path=str(pq)), "train", max_samples=1)) == 1


def test_missing_column_error(snippets_jsonl):
    with pytest.raises(ValueError, match="Text column 'sentence' not found.*available columns"):
        load_text_dataset(DataConfig(path=str(snippets_jsonl), text_column="sentence"), "train")
    with pytest.raises(ValueError, match="Label column"):
        load_text_dataset(DataConfig(path=str(snippets_jsonl), label_column="topic"), "train")


def test_empty_split_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "validation.jsonl").write_text("")
    (tmp_path / "test.csv").write_text("text\n")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(DataConfig(path=str(tmp_path / "test.csv")), "train")


def test_missing_split_error(snippets_jsonl):
    with pytest.raises(ValueError, match="Split 'test' is not available"):
        load_text_dataset(DataConfig(path=str(snippets_jsonl)), "test")


def test_empty_strings_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine text"}\n{"text": "   "}\n{"text": null}\n')
    with pytest.raises(ValueError, match="2 empty or non-string texts.*\\[1, 2\\]"):
        load_text_dataset(DataConfig(path=str(data)), "train")


def test_missing_path_errors(tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        load_text_dataset(DataConfig(path=""), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(DataConfig(path=str(tmp_path / "nope.jsonl")), "train")
    bad = tmp_path / "d.xml"
    bad.write_text("<a/>")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_text_dataset(DataConfig(path=str(bad)), "train")


def test_truncation_counted(tiny_tokenizer):
    texts = ["the cat sat", "the cat sat on the mat and the dog ran in the park"]
    assert count_truncated(tiny_tokenizer, texts, max_length=8) == 1
    assert count_truncated(tiny_tokenizer, texts, max_length=64) == 0


def test_texts_the_latents_cannot_hold_are_an_error_naming_the_longest(tmp_path, snippets_jsonl, tiny_bart_dir):
    # max_length 6: most training sentences are longer; the error names the longest and the limit
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, max_length=6)
    with pytest.raises(
        ValueError, match=r"of 32 training texts .* max_length=6 tokens \(the longest, \d+ tokens: "
    ) as err:
        train_autoencoder(config)
    quoted = re.search(r"tokens: (['\"])(.*?)\1\)", str(err.value)).group(2)
    assert any(text.startswith(quoted) for text in SENTENCES[:32])
    assert "max_truncated_fraction=0.01" in str(err.value)
    # a user who accepts the cut says so
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, max_length=6, max_truncated_fraction=1.0)
    config.autoencoder.optimizer.max_steps = 2
    train_autoencoder(config)
    with pytest.raises(ValueError, match=r"max_truncated_fraction must be a share in \[0, 1\], got 1.5"):
        tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, max_truncated_fraction=1.5)


def test_training_rejects_bad_data_before_building_model(tmp_path, snippets_jsonl, tiny_bart_dir):
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir)
    config.data.text_column = "body"
    with pytest.raises(ValueError, match="Text column 'body'"):
        train_autoencoder(config)


def test_max_length_above_the_backbones_positions_is_refused(tmp_path, snippets_jsonl, tiny_bart_dir):
    # before: a bare IndexError while caching the encoder states
    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, max_length=4096)
    with pytest.raises(ValueError, match=r"max_length=4096 exceeds the \d+ positions the backbone .* at most"):
        train_autoencoder(config)


def test_training_unknown_backbone(tmp_path, snippets_jsonl):
    config = tiny_config(tmp_path, snippets_jsonl, "my-favourite-lm")
    with pytest.raises(ValueError, match="Unknown backbone 'my-favourite-lm'.*Named backbones"):
        train_autoencoder(config)


def test_a_new_run_refuses_an_earlier_runs_checkpoints(tmp_path, snippets_jsonl, tiny_bart_dir):
    """A fresh run never mixes with (or deletes its own checkpoints in favour of) an older run's."""
    from latentlm.training.stages.autoencoder import CHECKPOINT_DIR

    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, save_every=2, optimizer=dict(max_steps=4))
    train_autoencoder(config)
    root = tmp_path / "run" / CHECKPOINT_DIR / "checkpoints"
    old = sorted(p.name for p in root.iterdir())
    other_seed = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, save_every=2, seed=1, optimizer=dict(max_steps=2))
    with pytest.raises(StaleCheckpointsError, match="--resume to continue it, --overwrite"):
        train_autoencoder(other_seed)
    with pytest.raises(StaleCheckpointsError, match="another config or seed"):
        train_autoencoder(other_seed, resume=True)
    assert sorted(p.name for p in root.iterdir()) == old  # nothing was touched
    # A half-written checkpoint of a killed save is cleaned up; --overwrite starts over.
    (root / ".tmp-step_00000006-deadbeef").mkdir()
    train_autoencoder(other_seed, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_truncated_history_file_does_not_break_resume(tmp_path, snippets_jsonl, tiny_bart_dir):
    from latentlm.training.run import _stage_done
    from latentlm.training.stages.autoencoder import FINAL_DIR, HISTORY_FILE

    config = tiny_config(tmp_path, snippets_jsonl, tiny_bart_dir, save_every=2, optimizer=dict(max_steps=2))
    train_autoencoder(config)
    history = tmp_path / "run" / HISTORY_FILE
    assert json.loads(history.read_text())["final_step"] == 2  # written whole, atomically
    assert not list((tmp_path / "run").glob(".tmp-*"))
    history.write_text('{"final_step": 2, "hist')  # what an in-place write killed half-way left before
    assert _stage_done(history, tmp_path / "run" / FINAL_DIR, 2) is False
