"""Stage 2 training: latent cache, train_diffusion (MLflow, resume, bad input), 2-process accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_tiny_text_autoencoder
from diffusers import DDPMScheduler
from latentlm.diffusion import LatentDenoiser
from safetensors.torch import load_file

import latentlm.training.loop as training_loop
from latentlm.config import load_config
from latentlm.data.labels import resolve_class_labels
from latentlm.training.latent_cache import LatentCache, build_latent_cache, latent_cache_key
from latentlm.training.loop import NonFiniteLossError
from latentlm.training.stages.diffusion import train_diffusion


@pytest.fixture
def autoencoder_dir(tmp_path, tiny_bart_dir) -> Path:
    """A saved TextAutoencoder folder (tiny BART, 4 x 8 latents) as stage 1 writes it."""
    path = tmp_path / "stage1" / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(path)
    return path


def tiny_config(tmp_path, data_path, label_column="label", **diffusion):
    diff = dict(
        denoiser_size="tiny",
        sample_every=0,
        save_every=1000,
        log_every=5,
        num_samples_per_class=2,
        sample_inference_steps=3,
        ema_decay=0.999,
        optimizer=dict(learning_rate=3e-3, batch_size=8, max_steps=20, warmup_steps=2, lr_schedule="cosine"),
    )
    for key, value in diffusion.items():
        if key == "optimizer":
            diff["optimizer"].update(value)
        else:
            diff[key] = value
    return load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"path": str(data_path), "label_column": label_column},
            "diffusion": diff,
            "tracking": {"enabled": False},
        }
    )


# ---------------------------------------------------------------- latent cache


def test_latent_cache_matches_encoder_and_is_reused(tmp_path, tiny_bart_dir, monkeypatch):
    model = make_tiny_text_autoencoder(tiny_bart_dir).eval()
    texts, labels = SENTENCES[:10], [i % 3 for i in range(10)]
    cache = build_latent_cache(
        model, texts, tmp_path, labels=labels, class_names=["a", "b", "c"], batch_size=4, show_progress=False
    )
    assert isinstance(cache.latents, np.memmap) or isinstance(cache.latents.base, np.memmap)
    assert cache.latents.shape == (10, 4, 8) and len(cache) == 10 and cache.class_names == ["a", "b", "c"]
    with torch.no_grad():
        expected = model.encode(texts)
    torch.testing.assert_close(torch.from_numpy(np.array(cache.latents)), expected, atol=1e-5, rtol=1e-5)
    z, y = cache.batch([3, 0, 3])
    torch.testing.assert_close(z, expected[[3, 0, 3]], atol=1e-5, rtol=1e-5)
    assert y.tolist() == [0, 0, 0] and y.dtype == torch.long

    # Same autoencoder and data: the cache is found by its key, nothing is encoded again.
    monkeypatch.setattr(type(model), "encode", lambda self, t: pytest.fail("re-encoded a cached dataset"))
    again = build_latent_cache(model, texts, tmp_path, labels=labels, show_progress=False)
    assert again.path == cache.path
    monkeypatch.undo()

    # Anything the latents depend on changes the key.
    key = latent_cache_key(model, texts, labels)
    assert latent_cache_key(model, texts[:9], labels[:9]) != key
    assert latent_cache_key(model, texts, [0] * 10) != key
    assert latent_cache_key(model, texts) != key
    model.max_length = 8
    assert latent_cache_key(model, texts, labels) != key
    model.max_length = 16
    # The reconstruction side does not change a text's latents (a decoder tuned on reuses the cache) ...
    compression = {id(p) for p in model.autoencoder.compression_parameters()}
    reconstruction = [p for p in model.autoencoder.parameters() if id(p) not in compression]
    with torch.no_grad():
        reconstruction[0].add_(1e-3)
    assert latent_cache_key(model, texts, labels) == key
    # ... the compression weights and the weights' dtype do.
    with torch.no_grad():
        model.autoencoder.compression_parameters()[0].add_(1e-3)
    assert latent_cache_key(model, texts, labels) != key
    changed = latent_cache_key(model, texts, labels)
    model.autoencoder.to(torch.bfloat16)
    assert latent_cache_key(model, texts, labels) != changed
    model.autoencoder.to(torch.float32)
    assert LatentCache.open(cache.path).latents.shape == (10, 4, 8)


def test_latent_cache_key_does_not_depend_on_the_folder_loaded_from(tmp_path, tiny_bart_dir):
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    model = make_tiny_text_autoencoder(tiny_bart_dir)
    model.save_pretrained(tmp_path / "autoencoder")
    model.save_pretrained(tmp_path / "decoder")
    texts = SENTENCES[:4]
    keys = {
        latent_cache_key(TextAutoencoder.from_pretrained(tmp_path / name), texts) for name in ("autoencoder", "decoder")
    }
    assert len(keys) == 1


def test_latent_cache_in_bf16_is_its_own_cache(tmp_path, tiny_bart_dir):
    model = make_tiny_text_autoencoder(tiny_bart_dir).eval()
    texts = SENTENCES[:6]
    full = build_latent_cache(model, texts, tmp_path, show_progress=False)
    half = build_latent_cache(model, texts, tmp_path, show_progress=False, mixed_precision="bf16")
    assert half.path != full.path and half.path.name == latent_cache_key(model, texts, mixed_precision="bf16")
    assert json.loads((half.path / "meta.json").read_text())["mixed_precision"] == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.encode(texts).float()
    torch.testing.assert_close(torch.from_numpy(np.array(half.latents)), expected)
    assert not np.array_equal(np.array(half.latents), np.array(full.latents))  # encoded in bf16, not copied
    # bf16 rounds the latents, it does not change them.
    torch.testing.assert_close(
        torch.from_numpy(np.array(half.latents)), torch.from_numpy(np.array(full.latents)), atol=0.1, rtol=0.05
    )


def test_latent_cache_bad_input(tmp_path, tiny_bart_dir):
    model = make_tiny_text_autoencoder(tiny_bart_dir)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        build_latent_cache(model, SENTENCES[:3], tmp_path, mixed_precision="fp8")
    with pytest.raises(ValueError, match="one label per text"):
        build_latent_cache(model, SENTENCES[:3], tmp_path, labels=[0, 1])
    with pytest.raises(ValueError, match="at least one"):
        build_latent_cache(model, [], tmp_path)
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        LatentCache.open(tmp_path / "nothing")


def test_resolve_class_labels():
    assert resolve_class_labels(None) == (None, [])
    assert resolve_class_labels(["pos", "neg", "pos"]) == ([1, 0, 1], ["neg", "pos"])
    assert resolve_class_labels([2, 10, 2]) == ([0, 1, 0], ["2", "10"])  # numbers sort numerically
    assert resolve_class_labels(["b"], ["b", "a"]) == ([0], ["b", "a"])
    with pytest.raises(ValueError, match=r"Labels \['c'\] are not in the class list"):
        resolve_class_labels(["a", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="no labels"):
        resolve_class_labels(None, ["a"])


# ---------------------------------------------------------------- train_diffusion


def test_short_run_trains_logs_samples_and_saves(tmp_path, snippets_jsonl, autoencoder_dir):
    import mlflow

    config = tiny_config(tmp_path, snippets_jsonl, sample_every=15, optimizer=dict(max_steps=30))
    config.tracking.enabled = True
    config.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config.tracking.experiment_name = "stage2-test"
    final = train_diffusion(config, autoencoder_dir)
    assert final == tmp_path / "run" / "diffusion"

    denoiser = LatentDenoiser.from_pretrained(final / "denoiser")
    assert denoiser.config.class_names == ["even", "odd"] and denoiser.config.num_classes == 2
    assert (denoiser.config.num_latents, denoiser.config.latent_dim) == (4, 8)
    assert torch.count_nonzero(denoiser.output_proj.weight) > 0  # trained (zero-initialised before)
    scheduler = DDPMScheduler.from_pretrained(final / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.clip_sample is False
    # The latent cache went next to the autoencoder, keyed, memory-mapped.
    (cache_path,) = list((autoencoder_dir / "latent_cache").iterdir())
    assert LatentCache.open(cache_path).latents.shape == (32, 4, 8)

    client = mlflow.MlflowClient(tracking_uri=config.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stage2-test").experiment_id])
    assert run.data.params["diffusion.denoiser_size"] == "tiny"
    assert run.data.params["diffusion.class_names"] == "even,odd"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {f"samples/step_{s:08d}.json" for s in (15, 30)}
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "samples/step_00000030.json", str(tmp_path / "dl"))).read_text()
    )
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]  # mlflow.log_table's split format
    assert [r["class"] for r in rows] == ["even", "even", "odd", "odd"] and all(r["step"] == 30 for r in rows)
    assert all(isinstance(r["text"], str) for r in rows)


def test_unconditional_run_and_cache_reuse(tmp_path, snippets_jsonl, autoencoder_dir, monkeypatch):
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    config = tiny_config(
        tmp_path, snippets_jsonl, label_column=None, self_conditioning_prob=0.0, optimizer=dict(max_steps=4)
    )
    final = train_diffusion(config, autoencoder_dir, cache_dir=tmp_path / "cache")
    denoiser = LatentDenoiser.from_pretrained(final / "denoiser")
    assert denoiser.config.num_classes == 0 and denoiser.class_embedding is None
    assert denoiser.config.self_conditioning is False
    assert len(list((tmp_path / "cache").iterdir())) == 1

    # A later run on the same autoencoder and data reads the cache instead of encoding again.
    monkeypatch.setattr(TextAutoencoder, "encode", lambda self, texts: pytest.fail("re-encoded the training set"))
    config.output_dir = str(tmp_path / "second")
    train_diffusion(config, autoencoder_dir, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_balance_classes_draws_every_class_equally_often(tmp_path, autoencoder_dir, monkeypatch):
    folder = tmp_path / "uneven"
    folder.mkdir()
    rows = [{"text": text, "label": "many" if i < 24 else "few"} for i, text in enumerate(SENTENCES[:32])]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn = []
    real_batch = LatentCache.batch

    def recording_batch(self, indices, device=None):
        latents, labels = real_batch(self, indices, device)
        drawn.append(labels.tolist())
        return latents, labels

    monkeypatch.setattr(LatentCache, "batch", recording_batch)
    # 48 balanced draws per epoch (24 + 8 repeated to 24): 6 steps of 8
    train_diffusion(
        tiny_config(tmp_path / "balanced", folder, balance_classes=True, optimizer=dict(max_steps=6)), autoencoder_dir
    )
    classes = torch.tensor([label for batch in drawn for label in batch])
    assert torch.bincount(classes).tolist() == [24, 24]
    drawn.clear()
    train_diffusion(tiny_config(tmp_path / "plain", folder, optimizer=dict(max_steps=4)), autoencoder_dir)
    classes = torch.tensor([label for batch in drawn for label in batch])
    assert sorted(torch.bincount(classes).tolist()) == [8, 24]  # one epoch, as the data are
    with pytest.raises(ValueError, match="balance_classes=true needs class labels"):
        train_diffusion(
            tiny_config(tmp_path / "none", folder, label_column=None, balance_classes=True), autoencoder_dir
        )


@pytest.mark.parametrize(
    "timesteps",
    [dict(timestep_sampling="importance"), dict(schedule="adaptive", adaptive_schedule_every=4)],
    ids=["importance_sampling", "adaptive_schedule"],
)
def test_resume_after_crash_equals_uninterrupted(tmp_path, snippets_jsonl, autoencoder_dir, monkeypatch, timesteps):
    # Everything random is on: dropout, self-conditioning coin, label dropout, and the timesteps'
    # own state (the importance sampler's loss history, or the adaptive schedule and its record).
    kwargs = dict(
        save_every=4, num_train_timesteps=20, denoiser={"dropout": 0.1}, optimizer=dict(max_steps=10), **timesteps
    )
    train_diffusion(tiny_config(tmp_path / "a", snippets_jsonl, **kwargs), autoencoder_dir)

    real_check = training_loop.check_finite

    def crash_at_step_9(losses, first_step):  # the losses of steps first_step, first_step + 1, ...
        if first_step <= 9 < first_step + len(losses):
            raise KeyboardInterrupt("simulated crash")
        real_check(losses, first_step)

    monkeypatch.setattr(training_loop, "check_finite", crash_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(tiny_config(tmp_path / "b", snippets_jsonl, **kwargs), autoencoder_dir)
    monkeypatch.setattr(training_loop, "check_finite", real_check)
    assert not (tmp_path / "b" / "run" / "diffusion").exists()
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "diffusion_training" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"]
    train_diffusion(tiny_config(tmp_path / "b", snippets_jsonl, **kwargs), autoencoder_dir, resume=True)

    a = load_file(str(tmp_path / "a" / "run" / "diffusion" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "diffusion" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    schedules = [
        json.loads((tmp_path / run / "run" / "diffusion" / "scheduler" / "scheduler_config.json").read_text())
        for run in ("a", "b")
    ]
    assert schedules[0] == schedules[1]
    # the adaptive schedule was re-fitted (twice, at steps 4 and 8) and is what the pipeline samples on
    assert (schedules[0]["trained_betas"] is not None) == ("schedule" in timesteps)


def test_bad_inputs(tmp_path, snippets_jsonl, autoencoder_dir):
    with pytest.raises(FileNotFoundError, match="No trained autoencoder"):
        train_diffusion(tiny_config(tmp_path, snippets_jsonl), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="pass its autoencoder folder"):
        train_diffusion(tiny_config(tmp_path, snippets_jsonl), autoencoder_dir.parent)
    with pytest.raises(ValueError, match="Latent shape mismatch"):
        train_diffusion(tiny_config(tmp_path, snippets_jsonl, denoiser={"latent_dim": 16}), autoencoder_dir)
    with pytest.raises(ValueError, match=r"Labels \['odd'\] are not in the class list"):
        train_diffusion(tiny_config(tmp_path, snippets_jsonl, denoiser={"class_names": ["even"]}), autoencoder_dir)
    with pytest.raises(ValueError, match="Unknown diffusion.denoiser keys"):
        train_diffusion(tiny_config(tmp_path, snippets_jsonl, denoiser={"width": 3}), autoencoder_dir)
    with pytest.raises(NonFiniteLossError, match="learning_rate"):
        train_diffusion(
            tiny_config(tmp_path, snippets_jsonl, optimizer=dict(learning_rate=1e30, warmup_steps=0, max_grad_norm=0)),
            autoencoder_dir,
        )


# ---------------------------------------------------------------- accelerate, 2 processes


LAUNCH_SCRIPT = textwrap.dedent(
    """
    import sys
    from latentlm.config import load_config
    from latentlm.training.stages.diffusion import train_diffusion

    out, data, autoencoder = sys.argv[1:4]
    config = load_config({
        "output_dir": out,
        "data": {"path": data, "label_column": "label"},
        "diffusion": {"denoiser_size": "tiny", "sample_every": 0, "save_every": 3, "log_every": 2,
                      "mixed_precision": "bf16",
                      "optimizer": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 6, "warmup_steps": 1}},
        "tracking": {"enabled": False},
    })
    train_diffusion(config, autoencoder)

    from accelerate import PartialState

    state = PartialState()
    print(f"finished rank {state.process_index} of {state.num_processes} ({state.distributed_type})")
    """
)


def test_two_process_accelerate_launch_on_cpu(tmp_path, snippets_jsonl, autoencoder_dir):
    script = tmp_path / "launch_train.py"
    script.write_text(LAUNCH_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        # On a machine without GPUs, `--multi_gpu` is how accelerate starts torchrun; make_accelerator then
        # picks the gloo MULTI_CPU backend (`--cpu` would start a single process).
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(script),
        str(tmp_path / "run"),
        str(snippets_jsonl),
        str(autoencoder_dir),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished rank 0 of 2 (DistributedType.MULTI_CPU)" in result.stdout
    assert "finished rank 1 of 2 (DistributedType.MULTI_CPU)" in result.stdout
    final = tmp_path / "run" / "diffusion"
    denoiser = LatentDenoiser.from_pretrained(final / "denoiser")
    assert torch.count_nonzero(denoiser.output_proj.weight) > 0
    history = json.loads((tmp_path / "run" / "diffusion_history.json").read_text())
    assert history["final_step"] == 6
    assert (tmp_path / "run" / "diffusion_training" / "checkpoints" / "step_00000003").is_dir()


def test_denoised_latents_follow_the_noise_level_and_self_condition():
    # What a decoder tuned after stage 2 reads: the denoiser's ẑ0 of noised latents, from a first pass
    # and a second one self-conditioned on it (as in sampling).
    from latentlm.diffusion import LatentDenoiser, denoised_latents, make_noise_scheduler

    torch.manual_seed(0)
    denoiser = LatentDenoiser.from_size("tiny", num_latents=4, latent_dim=8, num_classes=2).eval()
    scheduler = make_noise_scheduler(num_train_timesteps=1000)
    latents = torch.randn(3, 4, 8)
    self_conds = []
    forward = denoiser.forward
    denoiser.forward = lambda *a, **k: self_conds.append(k.get("self_cond")) or forward(*a, **k)
    # The output projection starts at zero (v = 0): ẑ0 = sqrt(ᾱ_t) z_t, the latents at t = 0, 0 at t = T.
    clean = denoised_latents(denoiser, scheduler, latents, (0.0, 0.0), class_labels=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(clean, latents, atol=0.02, rtol=0)
    assert self_conds[0] is None and self_conds[1] is not None and len(self_conds) == 2
    assert denoised_latents(denoiser, scheduler, latents, (1.0, 1.0)).abs().max() < 0.05
    mid = [denoised_latents(denoiser, scheduler, latents, (0.3, 0.6), generator=torch.Generator().manual_seed(1))]
    mid.append(denoised_latents(denoiser, scheduler, latents, (0.3, 0.6), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(mid[0], mid[1], atol=0, rtol=0)  # drawn from the generator
    assert not torch.allclose(mid[0], latents, atol=0.05)
    with pytest.raises(ValueError, match="noise_levels"):
        denoised_latents(denoiser, scheduler, latents, (0.6, 0.3))


def test_validation_labels_without_a_class_are_warned_about(tmp_path, caplog):
    from latentlm.config import load_config
    from latentlm.data.labels import warn_unseen_validation_classes

    for split, labels in (("train", ["a", "b"]), ("validation", ["a", "c"])):
        rows = [json.dumps({"text": f"text {i}", "label": label}) for i, label in enumerate(labels)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    config = load_config({"data": {"path": str(tmp_path), "label_column": "label"}})
    with caplog.at_level("WARNING"):
        warn_unseen_validation_classes(config.data, ["a", "b"])
    assert "labels ['c'] that no training example has" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_unseen_validation_classes(config.data, ["a", "b", "c"])
    assert not caplog.text
