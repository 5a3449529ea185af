"""LatentTextDiffusionPipeline on tiny models: sampling, schedulers, guidance, save/load, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_text_autoencoder
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
from latentlm.pipelines import LatentTextDiffusionPipeline, LatentTextDiffusionPipelineOutput
from latentlm.pipelines.pipeline_latent_text_diffusion import slerp

CLASSES = ["even", "odd"]
FAST_DECODE = dict(num_beams=1, max_length=10, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0)

SCHEDULERS = {
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
}


def make_denoiser(num_classes: int = 2, **kwargs) -> LatentDenoiser:
    torch.manual_seed(0)
    denoiser = LatentDenoiser.from_size(
        "tiny",
        num_latents=4,
        latent_dim=8,
        dropout=0.0,
        num_classes=num_classes,
        class_names=CLASSES[:num_classes] if num_classes else None,
        **kwargs,
    )
    # The output projection is zero-initialised (an untrained model predicts 0); random weights
    # make the output depend on the inputs, so determinism and save/load checks mean something.
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.3)
    return denoiser.eval()


def make_pipeline(text_autoencoder, denoiser=None, scheduler=None) -> LatentTextDiffusionPipeline:
    pipe = LatentTextDiffusionPipeline(
        tokenizer=text_autoencoder.tokenizer,
        language_model=text_autoencoder.merged_language_model(),
        autoencoder=text_autoencoder.autoencoder,
        denoiser=denoiser if denoiser is not None else make_denoiser(),
        scheduler=scheduler if scheduler is not None else make_noise_scheduler(num_train_timesteps=1000),
        max_length=text_autoencoder.max_length,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tiny_text_autoencoder):
    return make_pipeline(tiny_text_autoencoder)


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("decode_kwargs", FAST_DECODE)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


# ------------------------------------------------------------------------------------------------
# An exact denoiser: it knows the clean latents x0[class] and returns the true target for them.
# Every correct sampler must then end at x0 — and with guidance w at x0[null] + w (x0[c] - x0[null]),
# because the v / ε targets are affine in x0. This checks the scheduler loop, Euler's input
# scaling, the order of the CFG halves and the guidance formula, not just shapes.
# ------------------------------------------------------------------------------------------------


@__import__("dataclasses").dataclass
class _Out(BaseOutput):
    sample: torch.Tensor


class OracleDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        num_latents: int = 4,
        latent_dim: int = 8,
        num_classes: int = 2,
        class_names=None,
        self_conditioning: bool = True,
        prediction_type: str = "v_prediction",
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("targets", torch.randn(num_classes + 1, num_latents, latent_dim, generator=generator))
        self.register_buffer("alphas_cumprod", make_noise_scheduler(num_train_timesteps=1000).alphas_cumprod)
        self.calls: list[dict] = []

    def forward(self, sample, timestep, self_cond=None, class_labels=None, return_dict=True):
        self.calls.append(
            {
                "batch": sample.shape[0],
                "self_cond": None if self_cond is None else self_cond.clone(),
                "labels": None if class_labels is None else class_labels.clone(),
            }
        )
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), self.config.num_classes)
        x0 = self.targets[class_labels]
        t = torch.as_tensor(timestep).double().reshape(-1)
        lo = t.floor().long().clamp(0, 999)
        hi = (lo + 1).clamp(max=999)
        w = (t - lo.double()).clamp(0, 1)
        a = (self.alphas_cumprod.double()[lo] * (1 - w) + self.alphas_cumprod.double()[hi] * w).view(-1, 1, 1)
        eps = (sample.double() - a.sqrt() * x0) / (1 - a).sqrt()
        if self.config.prediction_type == "v_prediction":
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        elif self.config.prediction_type == "epsilon":
            out = eps
        else:
            out = x0.double()
        return _Out(sample=out.float())


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_reaches_the_exact_latents(tiny_text_autoencoder, name):
    oracle = OracleDenoiser(class_names=CLASSES)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle)
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)
    trajectory = []
    out = run(
        pipe,
        num_samples=3,
        class_labels=["even", "odd", "even"],
        num_inference_steps=10,
        callback_on_step_end=lambda p, i, t, kw: trajectory.append(kw["latents"].clone()) or {},
    )
    expected = oracle.targets[torch.tensor([0, 1, 0])]
    torch.testing.assert_close(out.latents, expected, atol=2e-3, rtol=2e-3)
    # The scheduler's own trajectory ends there too (DDPM adds noise on its last jump, see the
    # pipeline): this fails if z_t were fed to the denoiser at the wrong scale (Euler).
    if name != "ddpm":
        torch.testing.assert_close(trajectory[-1], expected, atol=2e-3, rtol=2e-3)
    # every scheduler's samples are decoded to text
    assert len(out.texts) == 3 and all(isinstance(t, str) for t in out.texts)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_guidance_formula_and_single_batched_pass(tiny_text_autoencoder, name):
    oracle = OracleDenoiser(class_names=CLASSES)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle)
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)
    w = 3.0
    trajectory = []
    out = run(
        pipe,
        num_samples=2,
        class_labels=[1, 0],
        guidance_scale=w,
        num_inference_steps=8,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: trajectory.append(kw["latents"].clone()) or {},
    )
    null = oracle.targets[2]
    expected = torch.stack([null + w * (oracle.targets[c] - null) for c in (1, 0)])
    torch.testing.assert_close(out.latents, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(trajectory[-1], expected, atol=2e-3, rtol=2e-3)
    # one forward pass per step with the doubled batch: unconditional (null) half first
    assert len(oracle.calls) == 8
    assert all(call["batch"] == 4 for call in oracle.calls)
    assert oracle.calls[0]["labels"].tolist() == [2, 2, 1, 0]


def test_guidance_interval_guides_only_its_noise_levels(tiny_text_autoencoder):
    oracle = OracleDenoiser(class_names=CLASSES)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    steps = []
    out = run(
        pipe,
        num_samples=2,
        class_labels=[1, 0],
        guidance_scale=3.0,
        guidance_interval=(0.5, 1.0),
        num_inference_steps=8,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: steps.append(float(t)) or {},
    )
    high = [t / pipe.scheduler.config.num_train_timesteps >= 0.5 for t in steps]
    assert 0 < sum(high) < len(steps)
    # guided steps: the doubled batch, null half first; the others: the conditional half alone
    assert [call["batch"] for call in oracle.calls] == [4 if h else 2 for h in high]
    assert oracle.calls[-1]["labels"].tolist() == [1, 0]
    # the last step (low noise) is unguided: the sample is the classes' own targets
    torch.testing.assert_close(out.latents, oracle.targets[torch.tensor([1, 0])], atol=2e-3, rtol=2e-3)
    for bad in [(0.6, 0.4), (0.0, 1.5), (0.5,), "low"]:
        with pytest.raises(ValueError, match="guidance_interval must be"):
            run(pipe, num_samples=1, class_labels=0, guidance_scale=2.0, guidance_interval=bad)


def test_self_conditioning_feeds_back_previous_estimate(tiny_text_autoencoder):
    oracle = OracleDenoiser(class_names=CLASSES)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    seen = []
    run(
        pipe,
        num_samples=2,
        class_labels="odd",
        num_inference_steps=5,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["pred_original_sample"].clone()) or {},
        callback_on_step_end_tensor_inputs=["pred_original_sample"],
    )
    assert oracle.calls[0]["self_cond"] is None  # first step: no estimate yet (the model uses zeros)
    for step in range(1, 5):
        torch.testing.assert_close(oracle.calls[step]["self_cond"], seen[step - 1])
    # the oracle's estimate is the target itself
    torch.testing.assert_close(seen[-1], oracle.targets[[1, 1]], atol=1e-3, rtol=1e-3)


def test_no_self_conditioning_model_gets_none(tiny_text_autoencoder):
    oracle = OracleDenoiser(class_names=CLASSES, self_conditioning=False)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle)
    run(pipe, num_samples=1, num_inference_steps=3, output_type="latent")
    assert all(call["self_cond"] is None for call in oracle.calls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_other_prediction_types(tiny_text_autoencoder, prediction_type):
    oracle = OracleDenoiser(class_names=CLASSES, prediction_type=prediction_type)
    scheduler = make_noise_scheduler(prediction_type=prediction_type, num_train_timesteps=1000)
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=oracle, scheduler=scheduler)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = run(pipe, num_samples=2, class_labels="even", num_inference_steps=10, output_type="latent")
    torch.testing.assert_close(out.latents, oracle.targets[[0, 0]], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize(
    "prediction_type,name",
    [
        ("v_prediction", "ddim"),
        ("epsilon", "ddim"),
        ("sample", "ddim"),
        ("v_prediction", "dpm++"),
        ("v_prediction", "euler"),
    ],
)
def test_clamping_steps_from_the_estimate_on_the_latent_sphere(tiny_bart_dir, prediction_type, name):
    oracle = OracleDenoiser(class_names=CLASSES, prediction_type=prediction_type)
    scheduler = make_noise_scheduler(prediction_type=prediction_type, num_train_timesteps=1000)
    text_autoencoder = make_tiny_text_autoencoder(tiny_bart_dir, normalize_latents=True)
    pipe = make_pipeline(text_autoencoder, denoiser=oracle, scheduler=scheduler)
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)
    steps = []
    kwargs = dict(num_samples=2, class_labels="odd", num_inference_steps=10, output_type="latent")
    out = run(
        pipe,
        clamp_latents=True,
        callback_on_step_end=lambda p, i, t, kw: steps.append(kw) or {},
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
        **kwargs,
    )
    on_sphere = pipe.autoencoder.project(oracle.targets[[1, 1]])
    # every step's estimate is on the sphere, and the scheduler stepped from it: its last z_t is that estimate
    for kw in steps:  # (ε-prediction's ẑ0 carries float error from the noisiest steps)
        torch.testing.assert_close(kw["pred_original_sample"], on_sphere, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(steps[-1]["latents"], on_sphere, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(out.latents, on_sphere, atol=5e-3, rtol=5e-3)
    unclamped = run(pipe, **kwargs)
    torch.testing.assert_close(unclamped.latents, oracle.targets[[1, 1]], atol=5e-3, rtol=5e-3)
    assert (unclamped.latents - on_sphere).abs().max() > 0.1


def test_model_output_from_original_sample_inverts_predict_original_sample():
    from latentlm.diffusion import model_output_from_original_sample, predict_original_sample

    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 3, 4, 8, generator=generator).double()
    for prediction_type in ["v_prediction", "epsilon", "sample"]:
        scheduler = make_noise_scheduler(prediction_type=prediction_type, num_train_timesteps=1000)
        for t in [torch.tensor([3, 500, 999]), 250, 412.5]:
            z0 = predict_original_sample(scheduler, output, sample, t)
            back = model_output_from_original_sample(scheduler, z0, sample, t)
            torch.testing.assert_close(back, output)
        with pytest.raises(ValueError, match="Unknown prediction_type"):
            model_output_from_original_sample(scheduler, output, sample, 10, prediction_type="score")


def test_sampling_options_on_the_command_line():
    import argparse

    from latentlm.pipelines import SamplingOptions

    parser = argparse.ArgumentParser()
    SamplingOptions.add_arguments(parser)
    given = parser.parse_args(["--steps", "7", "--clamp-latents", "--guidance-interval", "0.2", "0.9"])
    options = SamplingOptions.from_arguments(given)
    assert (options.num_inference_steps, options.clamp_latents, options.guidance_interval) == (7, True, (0.2, 0.9))
    assert SamplingOptions.from_arguments(parser.parse_args([])) == SamplingOptions()
    sampled = parser.parse_args(["--decode-kwargs", '{"do_sample": true, "top_p": 0.95}'])
    assert SamplingOptions.from_arguments(sampled).decode_kwargs == {"do_sample": True, "top_p": 0.95}
    for bad in ("top_p=0.9", "[1, 2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--decode-kwargs", bad])


def test_clamping_needs_normalized_latents(tiny_bart_dir):
    text_autoencoder = make_tiny_text_autoencoder(tiny_bart_dir, normalize_latents=False)
    pipe = make_pipeline(text_autoencoder, denoiser=OracleDenoiser(class_names=CLASSES))
    with pytest.raises(ValueError, match="does not normalize its latents"):
        run(pipe, num_samples=1, class_labels=0, clamp_latents=True, output_type="latent")
    with pytest.raises(ValueError, match="clamp_latents must be True or False"):
        run(pipe, num_samples=1, class_labels=0, clamp_latents="yes", output_type="latent")


# ------------------------------------------------------------------------------------------------
# Real (tiny, random) LatentDenoiser
# ------------------------------------------------------------------------------------------------


def test_output_shapes_and_types(pipe):
    out = run(pipe, num_samples=3)
    assert isinstance(out, LatentTextDiffusionPipelineOutput)
    assert out.latents.shape == (3, 4, 8) and out.latents.dtype == torch.float32
    assert len(out.texts) == 3 and all(isinstance(t, str) for t in out.texts)
    latent_only = run(pipe, num_samples=2, output_type="latent")
    assert latent_only.texts is None and latent_only.latents.shape == (2, 4, 8)
    texts, latents = run(pipe, num_samples=2, return_dict=False)
    assert len(texts) == 2 and latents.shape == (2, 4, 8)


def test_same_generator_same_texts(pipe):
    a = run(pipe, seed=7, num_samples=4, class_labels="odd", guidance_scale=2.0)
    b = run(pipe, seed=7, num_samples=4, class_labels="odd", guidance_scale=2.0)
    c = run(pipe, seed=8, num_samples=4, class_labels="odd", guidance_scale=2.0)
    assert a.texts == b.texts
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_ddpm_stochastic_steps_use_the_generator(pipe):
    assert isinstance(pipe.scheduler, DDPMScheduler)
    noise = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    a = pipe(
        num_samples=2,
        latents=noise,
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator().manual_seed(1),
    ).latents
    b = pipe(
        num_samples=2,
        latents=noise,
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator().manual_seed(2),
    ).latents
    assert not torch.allclose(a, b)  # same start, different step noise


def test_class_labels_by_name_equal_by_id(pipe):
    by_name = run(pipe, num_samples=2, class_labels=["odd", "even"], guidance_scale=1.5)
    by_id = run(pipe, num_samples=2, class_labels=[1, 0], guidance_scale=1.5)
    by_tensor = run(pipe, num_samples=2, class_labels=torch.tensor([1, 0]), guidance_scale=1.5)
    assert torch.equal(by_name.latents, by_id.latents) and torch.equal(by_id.latents, by_tensor.latents)
    # the class changes the samples
    other = run(pipe, num_samples=2, class_labels=["even", "odd"], guidance_scale=1.5)
    assert not torch.allclose(other.latents, by_name.latents)
    assert pipe.class_names == CLASSES


def test_given_latents_are_used(pipe):
    noise = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    a = pipe(num_samples=2, latents=noise, num_inference_steps=3, output_type="latent").latents
    b = pipe(num_samples=2, latents=noise.clone(), num_inference_steps=3, output_type="latent").latents
    assert torch.equal(a, b)


def test_callback_on_step_end_can_replace_tensors(pipe):
    steps = []

    def callback(p, i, t, tensors):
        steps.append(i)
        assert set(tensors) == {"latents", "pred_original_sample"}
        return {"pred_original_sample": torch.zeros_like(tensors["pred_original_sample"])} if i == 2 else {}

    out = run(
        pipe,
        num_samples=2,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    assert steps == [0, 1, 2]
    assert torch.equal(out.latents, torch.zeros(2, 4, 8))  # the last estimate is the output

    # replacing z_t changes what follows
    plain = run(pipe, num_samples=2, num_inference_steps=3, output_type="latent")
    moved = run(
        pipe,
        num_samples=2,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] + 1.0} if i == 0 else {},
    )
    assert not torch.allclose(plain.latents, moved.latents)


def test_progress_bar_goes_through_diffusers(pipe, capsys):
    pipe.set_progress_bar_config(disable=False, desc="denoise-test")
    run(pipe, num_samples=1, num_inference_steps=3, output_type="latent")
    assert "denoise-test" in capsys.readouterr().err


def test_unconditional_model_samples_without_labels(tiny_text_autoencoder):
    pipe = make_pipeline(tiny_text_autoencoder, denoiser=make_denoiser(num_classes=0))
    assert pipe.class_names == []
    out = run(pipe, num_samples=2)
    assert len(out.texts) == 2


def test_encode_decode_interpolate(pipe, tiny_sentences):
    latents = pipe.encode(tiny_sentences[:3])
    assert latents.shape == (3, 4, 8)
    texts = pipe.decode(latents, **FAST_DECODE)
    assert len(texts) == 3
    assert pipe.encode(tiny_sentences[0]).shape == (1, 4, 8)
    path = pipe.interpolate(tiny_sentences[0], tiny_sentences[1], num_steps=4, **FAST_DECODE)
    assert len(path) == 4
    # the ends of the path are the two texts' own latents
    assert path[0] == pipe.decode(pipe.encode(tiny_sentences[0]), **FAST_DECODE)[0]
    assert path[-1] == pipe.decode(pipe.encode(tiny_sentences[1]), **FAST_DECODE)[0]
    assert pipe.interpolate(tiny_sentences[0], tiny_sentences[1], num_steps=3, method="lerp", **FAST_DECODE)


def test_slerp_keeps_ends_and_norms():
    a, b = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    a = a / a.norm(dim=-1, keepdim=True) * 8**0.5
    b = b / b.norm(dim=-1, keepdim=True) * 8**0.5
    path = slerp(a, b, torch.linspace(0, 1, 5).view(-1, 1, 1))
    torch.testing.assert_close(path[0], a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path[-1], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path.norm(dim=-1), torch.full((5, 3), 8**0.5), atol=1e-4, rtol=1e-4)
    # identical ends: no NaN
    assert torch.isfinite(slerp(a, a.clone(), torch.linspace(0, 1, 3).view(-1, 1, 1))).all()


def test_to_dtype_and_device(pipe):
    pipe = pipe.to("cpu", torch.bfloat16)
    assert pipe.denoiser.dtype == torch.bfloat16 and pipe.language_model.dtype == torch.bfloat16
    out = run(pipe, num_samples=2, class_labels="even", guidance_scale=2.0)
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    assert len(out.texts) == 2


def test_peft_language_model_is_merged(tiny_bart_dir):
    from peft import PeftModel

    text_autoencoder = make_tiny_text_autoencoder(tiny_bart_dir, decoder="lora", lora_r=2).eval()
    # make the adapter non-trivial (LoRA B starts at zero)
    with torch.no_grad():
        for name, param in text_autoencoder.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    pipe = LatentTextDiffusionPipeline(
        text_autoencoder.tokenizer,
        text_autoencoder.language_model,
        text_autoencoder.autoencoder,
        make_denoiser(),
        make_noise_scheduler(),
    )
    assert not isinstance(pipe.language_model, PeftModel)
    assert isinstance(text_autoencoder.language_model, PeftModel)  # the caller's model is untouched
    latents = text_autoencoder.encode(["the cat sat on the mat", "the sun is warm today"])
    assert pipe.decode(latents, **FAST_DECODE) == text_autoencoder.decode(latents, **FAST_DECODE)


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    files = [
        os.path.relpath(os.path.join(r, f), tmp_path / "pipe") for r, _, fs in os.walk(tmp_path / "pipe") for f in fs
    ]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    for component in ("language_model", "autoencoder", "denoiser"):
        assert any(f.startswith(component + os.sep) and f.endswith(".safetensors") for f in files), component
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_text_diffusion", "LatentTextDiffusionPipeline"]
    assert index["denoiser"][1] == "LatentDenoiser" and index["autoencoder"][1] == "LatentAutoencoder"

    loaded = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, LatentTextDiffusionPipeline)
    assert loaded.class_names == CLASSES and loaded.config.max_length == pipe.config.max_length
    a = run(pipe, num_samples=3, class_labels="odd", guidance_scale=2.0)
    b = run(loaded, num_samples=3, class_labels="odd", guidance_scale=2.0)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts

    # a swapped scheduler is saved and comes back
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    loaded.save_pretrained(tmp_path / "pipe2")
    again = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe2")
    assert isinstance(again.scheduler, DDIMScheduler)
    assert again.scheduler.config.prediction_type == "v_prediction" and not again.scheduler.config.clip_sample


def test_a_fine_tuned_decoder_swaps_in_as_components(pipe, tiny_bart_dir, tmp_path, tiny_sentences):
    # The route after stage 1 with freeze_compression: the saved pipeline loaded with the new autoencoder's
    # parts; the latents (and so the denoiser's samples) stay, the decoder is the new one, merged.
    from peft import PeftModel

    pipe.save_pretrained(tmp_path / "pipe")
    tuned = make_tiny_text_autoencoder(tiny_bart_dir, decoder="lora", lora_r=2).eval()
    tuned.autoencoder.load_state_dict(pipe.autoencoder.state_dict())
    with torch.no_grad():
        tuned.autoencoder.from_latent.weight.mul_(-1.0)
    swapped = LatentTextDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", tokenizer=tuned.tokenizer, language_model=tuned.language_model, autoencoder=tuned.autoencoder
    )
    assert swapped.autoencoder is tuned.autoencoder and not isinstance(swapped.language_model, PeftModel)
    torch.testing.assert_close(swapped.encode(tiny_sentences), pipe.encode(tiny_sentences), atol=0, rtol=0)
    a = pipe(num_samples=2, class_labels="even", generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    b = swapped(num_samples=2, class_labels="even", generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    torch.testing.assert_close(b.latents, a.latents, atol=0, rtol=0)
    assert b.texts == tuned.decode(b.latents, **swapped.config.decode_kwargs)


def test_generic_diffusers_loader_in_a_fresh_process(pipe, tmp_path):
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` with nothing of latentlm imported."""
    pipe.save_pretrained(tmp_path / "pipe")
    expected = run(pipe, num_samples=2, class_labels="even", guidance_scale=2.0)
    script = textwrap.dedent(f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        assert not any(m.startswith("latentlm") for m in sys.modules)
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(num_samples=2, class_labels="even", guidance_scale=2.0, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0), decode_kwargs={FAST_DECODE!r})
        print(json.dumps({{"cls": type(pipe).__name__, "texts": out.texts, "latents": out.latents.tolist()}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"] == "LatentTextDiffusionPipeline"
    assert result["texts"] == expected.texts
    torch.testing.assert_close(torch.tensor(result["latents"]), expected.latents, atol=1e-6, rtol=0)


def test_generic_loader_refuses_without_trust_remote_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "pipe")


def test_folder_missing_a_component(pipe, tmp_path):
    import shutil

    pipe.save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "denoiser")
    with pytest.raises(ValueError, match="denoiser"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe" / "autoencoder")
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_tampered_pipeline_file_is_not_run(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "pipeline_latent_text_diffusion.py").write_text("raise SystemExit('ran untrusted code')\n")
    with pytest.raises(ValueError, match="refusing to run code"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")


EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from latentlm.pipelines import LatentTextDiffusionPipeline
from latentlm.diffusion import LatentDenoiser
"""


def _plant_evil_module(folder, marker) -> None:
    (folder / "evil_module.py").write_text(EVIL_MODULE.format(marker=str(marker)))


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _loaders(folder):
    """Every way latentlm loads a pipeline folder: the class, `latentlm sample`'s loader and the MLflow model."""
    from latentlm.mlflow.pyfunc import _load_pyfunc
    from latentlm.sampling import load_pipeline

    return {
        "from_pretrained": lambda: LatentTextDiffusionPipeline.from_pretrained(folder),
        "latentlm sample": lambda: load_pipeline(folder),
        "mlflow pyfunc": lambda: _load_pyfunc(str(folder)),
    }


@pytest.mark.parametrize(
    "attack",
    ["class_name_module", "component_library", "tokenizer_auto_map", "language_model_auto_map", "custom_pipeline_key"],
)
def test_a_pipeline_folder_runs_no_code_of_its_own(pipe, tmp_path, monkeypatch, attack):
    """A folder from the internet is as safe to load as a diffusers pipeline without trust_remote_code:
    no variant of planting code in it gets that code run (issue: a folder could run arbitrary code)."""
    folder, marker = tmp_path / "pipe", tmp_path / "marker"
    pipe.save_pretrained(folder)
    _plant_evil_module(folder, marker)
    monkeypatch.syspath_prepend(str(folder))  # even where the folder is importable (a REPL started in it)
    monkeypatch.chdir(folder)
    index = folder / "model_index.json"
    if attack == "class_name_module":
        _edit_json(index, _class_name=["evil_module", "LatentTextDiffusionPipeline"])
        match = "_class_name"
    elif attack == "component_library":
        _edit_json(index, denoiser=["evil_module", "LatentDenoiser"])
        match = "evil_module"
    elif attack == "custom_pipeline_key":
        _edit_json(index, custom_pipeline="evil_module")
        match = "custom_pipeline"
    else:
        sub = "tokenizer/tokenizer_config.json" if attack == "tokenizer_auto_map" else "language_model/config.json"
        _edit_json(
            folder / sub, auto_map={"AutoTokenizer": ["evil_module.Evil", None], "AutoModel": "evil_module.Evil"}
        )
        match = "auto_map"
    for name, load in _loaders(folder).items():
        with pytest.raises(ValueError, match=match):
            load()
        assert not marker.exists(), f"{name} ran the folder's code"
    assert "evil_module" not in sys.modules


def test_from_pretrained_refuses_trust_remote_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    for key in ("trust_remote_code", "custom_pipeline"):
        with pytest.raises(ValueError, match=f"drop {key}"):
            LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe", **{key: True})


def test_a_saved_folder_loads_without_importing_its_stub(pipe, tmp_path, monkeypatch):
    # The entry-point stub is for diffusers' generic loader only: latentlm's own loader never imports it.
    import importlib

    pipe.save_pretrained(tmp_path / "pipe")
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    loaded = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is LatentTextDiffusionPipeline
    assert not any(
        "pipeline_latent_text_diffusion" == name.split(".")[-1] and "latentlm" not in name for name in imported
    )


@pytest.mark.parametrize("where", ["classifiers/length/pytorch_model.bin", "denoiser/diffusion_pytorch_model.bin"])
def test_pickled_weights_anywhere_in_a_folder_are_refused(pipe, tmp_path, where):
    pipe.save_pretrained(tmp_path / "pipe")
    planted = tmp_path / "pipe" / where
    planted.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1)}, planted)
    with pytest.raises(ValueError, match="pickled weight file; latentlm loads safetensors only"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")


def test_pickled_weights_in_an_autoencoder_folder_are_refused(tiny_bart_dir, tmp_path):
    from latentlm import TextAutoencoder

    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(tmp_path / "ae")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "ae" / "autoencoder" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin' is a pickled weight file"):
        TextAutoencoder.from_pretrained(tmp_path / "ae")


def test_pickle_serialization_is_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_more_inference_steps_than_train_timesteps_is_refused(pipe):
    with pytest.raises(ValueError, match="num_inference_steps=1001 exceeds the 1000 timesteps"):
        pipe(num_samples=1, num_inference_steps=1001)


def test_unknown_class_name_or_id(pipe):
    with pytest.raises(ValueError, match="unknown class name 'three'.*even"):
        run(pipe, num_samples=1, class_labels="three")
    with pytest.raises(ValueError, match="class id 5 is out of range"):
        run(pipe, num_samples=1, class_labels=5)
    with pytest.raises(ValueError, match="class id -1 is out of range"):
        run(pipe, num_samples=1, class_labels=[-1])
    with pytest.raises(ValueError, match="2 class labels for num_samples=3"):
        run(pipe, num_samples=3, class_labels=["odd", "even"])
    with pytest.raises(ValueError, match="class name"):
        run(pipe, num_samples=1, class_labels=[1.5])


def test_guidance_needs_a_conditional_model_and_labels(tiny_text_autoencoder, pipe):
    unconditional = make_pipeline(tiny_text_autoencoder, denoiser=make_denoiser(num_classes=0))
    with pytest.raises(ValueError, match="unconditional"):
        run(unconditional, num_samples=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        run(unconditional, num_samples=1, class_labels=0)
    with pytest.raises(ValueError, match="needs class_labels"):
        run(pipe, num_samples=1, guidance_scale=2.0)


def test_latents_of_the_wrong_shape(pipe):
    with pytest.raises(ValueError, match=r"latents have shape \(2, 4, 7\), expected \(2, 4, 8\)"):
        run(pipe, num_samples=2, latents=torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="expected"):
        run(pipe, num_samples=3, latents=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="latents have shape"):
        pipe.decode(torch.randn(2, 5, 8))


def test_scheduler_with_incompatible_prediction_type(pipe):
    pipe.scheduler = DDIMScheduler()  # diffusers default: epsilon, not the denoiser's v_prediction
    with pytest.raises(ValueError, match="prediction_type='epsilon'.*v_prediction.*from_config"):
        run(pipe, num_samples=1)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_samples"):
        run(pipe, num_samples=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(pipe, num_samples=1, num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, num_samples=1, output_type="pil")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, num_samples=1, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="num_steps"):
        pipe.interpolate("a", "b", num_steps=1)
    with pytest.raises(ValueError, match="method"):
        pipe.interpolate("the cat sat on the mat", "the sun is warm today", method="cubic")


def test_saved_decoding_defaults(tiny_text_autoencoder, tmp_path, tiny_sentences):
    short = dict(num_beams=1, max_length=3, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0)
    pipe = make_pipeline(tiny_text_autoencoder)
    pipe.register_to_config(decode_kwargs=short)
    latents = pipe.encode(tiny_sentences[:4])
    texts = pipe.decode(latents)
    assert texts == tiny_text_autoencoder.decode(latents, **short)
    assert all(len(t.split()) <= 2 for t in texts)  # max_length 3 = decoder start + 2 tokens
    # a call's own kwargs win over the saved ones
    assert pipe.decode(latents, max_length=6) == tiny_text_autoencoder.decode(latents, **{**short, "max_length": 6})
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.decode_kwargs == short
    assert loaded.decode(latents) == texts
