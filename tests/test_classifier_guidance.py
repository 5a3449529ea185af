"""Plug-and-play control: latent classifiers on noisy latents, their training stage, and classifier
guidance in the pipeline (composable with class labels and classifier-free guidance)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_text_autoencoder
from latentlm.diffusion import (
    LatentClassifier,
    guide_model_output,
    latent_fingerprint,
    make_noise_scheduler,
    predict_original_sample,
)
from latentlm.pipelines import LatentTextDiffusionPipeline

from latentlm.config import load_config

FAST = dict(num_beams=1, max_length=8, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0)


@pytest.fixture
def pipe(tiny_bart_dir):
    return make_tiny_pipeline(tiny_bart_dir)


def sign_classifier(pipe, steps: int = 150) -> LatentClassifier:
    """A classifier of sign(mean of z0) -> "neg"/"pos", trained on noised random latents."""
    torch.manual_seed(0)
    classifier = LatentClassifier(
        num_latents=4,
        latent_dim=8,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        class_names=["neg", "pos"],
        autoencoder_fingerprint=latent_fingerprint(pipe.autoencoder),
    )
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    scheduler = pipe.scheduler
    for _ in range(steps):
        z0 = torch.randn(64, 4, 8) + torch.randn(64, 1, 1)
        t = torch.randint(0, 1000, (64,))
        z_t = scheduler.add_noise(z0, torch.randn_like(z0), t)
        loss = torch.nn.functional.cross_entropy(classifier(z_t, t), (z0.mean(dim=(1, 2)) > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def length_regressor(pipe) -> LatentClassifier:
    return LatentClassifier(
        num_latents=4,
        latent_dim=8,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        task="regression",
        target_name="length",
        target_mean=6.0,
        target_std=2.0,
        autoencoder_fingerprint=latent_fingerprint(pipe.autoencoder),
    )


# ---------------------------------------------------------------- the model and the math


def test_classifier_outputs_save_load_and_bad_configs(tmp_path):
    classifier = LatentClassifier(
        num_latents=4, latent_dim=8, hidden_size=32, num_layers=1, num_heads=2, class_names=["a", "b", "c"]
    )
    z, t = torch.randn(5, 4, 8), torch.randint(0, 1000, (5,))
    assert classifier(z, t).shape == (5, 3) and classifier.predict(z, t).shape == (5,)
    assert classifier.log_likelihood(z, t, torch.tensor([0, 1, 2, 0, 1])).shape == (5,)
    classifier.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LatentClassifier.from_pretrained(tmp_path / "c").eval()
    torch.testing.assert_close(loaded(z, t), classifier.eval()(z, t))
    with pytest.raises(ValueError, match="at least 2 class_names"):
        LatentClassifier(class_names=["only"])
    with pytest.raises(ValueError, match="task="):
        LatentClassifier(task="ranking", class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"sample must be \[batch, 4, 8\]"):
        classifier(torch.randn(2, 3, 8), 0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_guidance_shifts_epsilon_by_alpha_bar_sigma_times_the_gradient(prediction_type):
    scheduler = make_noise_scheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    z_t, out, grad = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    t = torch.tensor([10, 500, 990])
    guided = guide_model_output(scheduler, out, z_t, t, grad, prediction_type=prediction_type)
    abar = scheduler.alphas_cumprod[t].double()[:, None, None]
    a, sigma = abar.sqrt(), (1 - abar).sqrt()
    z0 = predict_original_sample(scheduler, out, z_t, t, prediction_type=prediction_type).double()
    eps = (z_t.double() - a * z0) / sigma
    expected_z0 = (z_t.double() - sigma * (eps - abar * sigma * grad.double())) / a
    got_z0 = predict_original_sample(scheduler, guided, z_t, t, prediction_type=prediction_type).double()
    torch.testing.assert_close(got_z0, expected_z0, rtol=1e-4, atol=1e-4)
    # no gradient: nothing changes
    same = guide_model_output(scheduler, out, z_t, t, torch.zeros_like(grad), prediction_type=prediction_type)
    torch.testing.assert_close(same, out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- guided sampling


def test_classifier_guidance_steers_samples_and_composes_with_cfg(pipe, tmp_path):
    pipe.add_classifier("sign", sign_classifier(pipe))
    classifier = pipe.classifiers["sign"]

    def share_positive(**kwargs):
        out = pipe(
            num_samples=32,
            num_inference_steps=10,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        return float((classifier.predict(out.latents, torch.zeros(32, dtype=torch.long)) == 1).float().mean())

    baseline = share_positive()
    towards_pos = share_positive(controls={"sign": "pos"}, control_scale=100.0)
    towards_neg = share_positive(controls={"sign": 0}, control_scale=100.0)
    assert towards_pos >= 0.9 and towards_neg <= 0.1, (baseline, towards_pos, towards_neg)
    # with a class and classifier-free guidance, and per-sample targets
    both = share_positive(
        class_labels="odd",
        guidance_scale=2.0,
        controls={"sign": ["pos"] * 16 + ["neg"] * 16},
        control_scale={"sign": 100.0},
    )
    assert 0.4 <= both <= 0.6
    # a zero scale is no guidance
    assert share_positive(controls={"sign": "pos"}, control_scale=0.0) == baseline

    # saved and loaded with the pipeline; an old folder without classifiers still loads
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "classifiers" / "sign" / "config.json").is_file()
    loaded = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "p")
    assert sorted(loaded.classifiers) == ["sign"]
    loaded.set_progress_bar_config(disable=True)
    out = loaded(num_samples=2, num_inference_steps=3, controls={"sign": "pos"}, control_scale=5.0, decode_kwargs=FAST)
    assert len(out.texts) == 2
    import shutil

    shutil.rmtree(tmp_path / "p" / "classifiers")
    assert LatentTextDiffusionPipeline.from_pretrained(tmp_path / "p").classifiers == {}


def test_several_controls_and_a_regression_target(pipe):
    pipe.add_classifier("sign", sign_classifier(pipe, steps=20))
    pipe.add_classifier("length", length_regressor(pipe))
    out = pipe(
        num_samples=3,
        num_inference_steps=4,
        controls={"sign": "pos", "length": 7},
        control_scale={"sign": 2.0, "length": 1.0},
        output_type="latent",
    )
    assert torch.isfinite(out.latents).all()


def test_bad_controls_get_clear_errors(pipe):
    pipe.add_classifier("sign", sign_classifier(pipe, steps=1))
    pipe.add_classifier("length", length_regressor(pipe))
    call = dict(num_samples=2, num_inference_steps=2, output_type="latent")
    with pytest.raises(
        ValueError, match=r"unknown control\(s\) \['mood'\]; this pipeline carries \['length', 'sign'\]"
    ):
        pipe(**call, controls={"mood": "happy"})
    with pytest.raises(ValueError, match="unknown class 'maybe'; this classifier knows"):
        pipe(**call, controls={"sign": "maybe"})
    with pytest.raises(ValueError, match="predicts a number"):
        pipe(**call, controls={"length": "long"})
    with pytest.raises(ValueError, match="predicts a number"):
        pipe(**call, controls={"length": True})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        pipe(**call, controls={"sign": "pos"}, control_scale=-1.0)
    with pytest.raises(ValueError, match="not in controls"):
        pipe(**call, controls={"sign": "pos"}, control_scale={"length": 1.0})
    with pytest.raises(ValueError, match="3 targets for num_samples=2"):
        pipe(**call, controls={"sign": ["pos", "neg", "pos"]})


def test_a_classifier_of_another_latent_space_is_refused(pipe):
    wrong_shape = LatentClassifier(
        num_latents=5, latent_dim=8, hidden_size=32, num_layers=1, num_heads=2, class_names=["a", "b"]
    )
    with pytest.raises(ValueError, match="trained on another autoencoder"):
        pipe.add_classifier("x", wrong_shape)
    other = LatentClassifier(
        num_latents=4,
        latent_dim=8,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        class_names=["a", "b"],
        autoencoder_fingerprint="0123456789abcdef",
    )
    with pytest.raises(ValueError, match="latents of another autoencoder"):
        pipe.add_classifier("x", other)
    # The fingerprint names the latent space: a reconstruction side trained on keeps it, compression does not.
    before = latent_fingerprint(pipe.autoencoder)
    with torch.no_grad():
        pipe.autoencoder.from_latent.weight.add_(1.0)
        assert latent_fingerprint(pipe.autoencoder) == before
        pipe.autoencoder.to_latent.weight.add_(1.0)
        assert latent_fingerprint(pipe.autoencoder) != before
    with pytest.raises(TypeError, match="must be a LatentClassifier"):
        pipe.add_classifier("x", torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- training


@pytest.fixture
def autoencoder_dir(tmp_path, tiny_bart_dir):
    path = tmp_path / "run" / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(path)
    return path


def classifier_config(tmp_path, data, **classifier):
    section = dict(
        eval_every=10,
        save_every=10,
        log_every=5,
        num_noise_levels=3,
        classifier=dict(hidden_size=32, num_layers=1, num_heads=2),
        optimizer=dict(learning_rate=3e-3, batch_size=8, max_steps=20, warmup_steps=2),
        **classifier,
    )
    return load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"path": str(data), "max_eval_samples": 8},
            "classifier": section,
            "tracking": {"enabled": False},
        }
    )


def test_train_classifier_and_length_regressor_save_noise_level_metrics(tmp_path, snippets_jsonl, autoencoder_dir):
    from latentlm.training.stages.classifier import train_classifier

    final = train_classifier(classifier_config(tmp_path, snippets_jsonl, label_column="label"), autoencoder_dir)
    assert final == tmp_path / "run" / "classifiers" / "label"
    classifier = LatentClassifier.from_pretrained(final)
    assert classifier.config.class_names == ["even", "odd"] and classifier.config.task == "classification"
    levels = json.loads((final / "noise_levels.json").read_text())["accuracy"]
    assert sorted(levels, key=int) == ["0", "500", "999"] and all(0 <= v <= 1 for v in levels.values())
    history = json.loads((tmp_path / "run" / "classifier_label_history.json").read_text())
    assert [h["step"] for h in history["history"]] == [10, 20]

    final = train_classifier(classifier_config(tmp_path, snippets_jsonl, target="length", name="len"), autoencoder_dir)
    regressor = LatentClassifier.from_pretrained(final)
    assert regressor.config.task == "regression" and regressor.config.target_name == "len"
    assert 3 < regressor.config.target_mean < 10
    assert "mae" in json.loads((final / "noise_levels.json").read_text())


def test_train_classifier_bad_input(tmp_path, snippets_jsonl, autoencoder_dir):
    from latentlm.training.stages.classifier import train_classifier

    with pytest.raises(ValueError, match="exactly one of classifier.label_column"):
        train_classifier(classifier_config(tmp_path, snippets_jsonl), autoencoder_dir)
    with pytest.raises(ValueError, match="classifier.target='mood'"):
        train_classifier(classifier_config(tmp_path, snippets_jsonl, target="mood"), autoencoder_dir)
    with pytest.raises(ValueError, match="'sentiment' is not a column"):
        train_classifier(classifier_config(tmp_path, snippets_jsonl, label_column="sentiment"), autoencoder_dir)


def test_cli_trains_a_classifier_into_the_pipeline_and_samples_with_it(
    tmp_path, snippets_jsonl, autoencoder_dir, pipe, capsys
):
    import yaml

    # a pipeline folder over the same autoencoder, as `latentlm train` leaves it
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    from latentlm.cli import main

    ae = TextAutoencoder.from_pretrained(autoencoder_dir)
    run_pipe = LatentTextDiffusionPipeline(
        tokenizer=ae.tokenizer,
        language_model=ae.merged_language_model(),
        autoencoder=ae.autoencoder,
        denoiser=pipe.denoiser,
        scheduler=pipe.scheduler,
        max_length=16,
        decode_kwargs=FAST,
    )
    run_pipe.save_pretrained(tmp_path / "run" / "pipeline")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(classifier_config(tmp_path, snippets_jsonl).to_dict()))
    assert main(["train-classifier", "--config", str(config), "--label-column", "label", "--name", "parity"]) == 0
    assert "Added to the pipeline" in capsys.readouterr().out
    assert (tmp_path / "run" / "pipeline" / "classifiers" / "parity" / "noise_levels.json").is_file()
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(tmp_path / "run" / "pipeline"),
                "-n",
                "2",
                "--steps",
                "3",
                "--control",
                "parity=odd",
                "--control-scale",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2


@pytest.mark.parametrize("name", ["ddim", "dpm++", "unipc", "euler"])
def test_controls_work_with_every_scheduler_family(pipe, name):
    from latentlm.pipelines import make_scheduler

    pipe.add_classifier("sign", sign_classifier(pipe))
    classifier = pipe.classifiers["sign"]
    out = pipe(
        num_samples=16,
        num_inference_steps=8,
        output_type="latent",
        scheduler=make_scheduler(pipe.scheduler, name),
        generator=torch.Generator().manual_seed(1),
        controls={"sign": "pos"},
        control_scale=100.0,
    )
    assert torch.isfinite(out.latents).all()
    assert float((classifier.predict(out.latents, torch.zeros(16, dtype=torch.long)) == 1).float().mean()) >= 0.8
