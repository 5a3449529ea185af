"""LatentDenoiser, noise schedules and the training objective (CPU, tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from latentlm.diffusion import (
    DENOISER_SIZES,
    PREDICTION_TYPES,
    SCHEDULES,
    LatentDenoiser,
    LatentDenoiserOutput,
    TimestepImportanceSampler,
    diffusion_loss,
    diffusion_target,
    make_noise_scheduler,
    predict_original_sample,
)

N, D = 4, 8


def tiny(**kw) -> LatentDenoiser:
    torch.manual_seed(0)
    return LatentDenoiser.from_size("tiny", num_latents=N, latent_dim=D, dropout=0.0, **kw)


def randomise_output(model: LatentDenoiser) -> LatentDenoiser:
    """Zero-initialised output/modulation layers make an untrained model ignore its inputs; undo that."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "output_proj" in name:
                p.normal_(0, 0.2)
    return model


# ---------------------------------------------------------------- model


def test_output_shape_and_zero_init():
    model = tiny(num_classes=3)
    x = torch.randn(5, N, D)
    out = model(x, torch.tensor([0, 10, 100, 500, 999]), class_labels=torch.tensor([0, 1, 2, 3, 0]))
    assert isinstance(out, LatentDenoiserOutput)
    assert out.sample.shape == (5, N, D)
    # Zero-initialised output projection: an untrained denoiser predicts exactly 0.
    assert torch.count_nonzero(out.sample) == 0
    assert model(x, 7, return_dict=False)[0].shape == (5, N, D)  # scalar timestep broadcasts


def test_named_sizes():
    assert DENOISER_SIZES["base"] == dict(hidden_size=768, num_layers=12, num_heads=12, num_long_skips=3)
    assert DENOISER_SIZES["small"] == dict(hidden_size=384, num_layers=6, num_heads=6, num_long_skips=3)
    model = LatentDenoiser.from_size("small", num_classes=4)
    assert model.config.hidden_size == 384 and len(model.blocks) == 6 and len(model.skip_projs) == 3
    with pytest.raises(ValueError, match="Unknown denoiser size"):
        LatentDenoiser.from_size("huge")


def test_timestep_and_class_change_output():
    model = randomise_output(tiny(num_classes=2)).eval()
    x = torch.randn(2, N, D)
    a = model(x, torch.tensor([10, 10]), class_labels=torch.tensor([0, 0])).sample
    b = model(x, torch.tensor([900, 900]), class_labels=torch.tensor([0, 0])).sample
    c = model(x, torch.tensor([10, 10]), class_labels=torch.tensor([1, 1])).sample
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_null_class_is_default():
    model = randomise_output(tiny(num_classes=3)).eval()
    assert model.null_class_id == 3
    x, t = torch.randn(2, N, D), torch.tensor([5, 500])
    torch.testing.assert_close(model(x, t).sample, model(x, t, class_labels=torch.tensor([3, 3])).sample)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\]"):
        model(x, t, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class_labels must lie"):
        model(x, t, class_labels=torch.tensor([-1, 0]))


def test_unconditional_model():
    model = randomise_output(tiny(num_classes=0)).eval()
    assert model.class_embedding is None and model.null_class_id == 0
    x, t = torch.randn(3, N, D), torch.tensor([1, 2, 3])
    out = model(x, t).sample
    torch.testing.assert_close(out, model(x, t, class_labels=torch.zeros(3, dtype=torch.long)).sample)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, class_labels=torch.tensor([0, 1, 0]))
    # And it trains: the unconditional objective runs end to end with gradients.
    loss = diffusion_loss(model.train(), make_noise_scheduler(), torch.randn(4, N, D))
    loss.backward()
    assert model.output_proj.weight.grad is not None


def test_self_conditioning_path():
    model = randomise_output(tiny()).eval()
    x, t = torch.randn(2, N, D), torch.tensor([100, 100])
    none = model(x, t).sample
    torch.testing.assert_close(none, model(x, t, self_cond=torch.zeros_like(x)).sample)
    assert not torch.allclose(none, model(x, t, self_cond=torch.randn_like(x)).sample)
    assert model.input_proj.in_features == 2 * D

    plain = tiny(self_conditioning=False)
    assert plain.input_proj.in_features == D
    with pytest.raises(ValueError, match="self_conditioning=False"):
        plain(x, t, self_cond=torch.zeros_like(x))


def test_config_validation():
    with pytest.raises(ValueError, match="class_names has 2 entries but num_classes is 3"):
        tiny(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="num_long_skips"):
        LatentDenoiser(num_latents=N, latent_dim=D, hidden_size=32, num_layers=2, num_heads=2, num_long_skips=2)
    with pytest.raises(ValueError, match="divisible"):
        LatentDenoiser(num_latents=N, latent_dim=D, hidden_size=30, num_layers=2, num_heads=4, num_long_skips=1)
    model = tiny()
    with pytest.raises(ValueError, match=rf"sample must have shape \[batch, {N}, {D}\]"):
        model(torch.randn(2, N + 1, D), 3)


def test_save_and_load_roundtrip(tmp_path):
    model = randomise_output(tiny(num_classes=2, class_names=["neg", "pos"])).eval()
    model.save_pretrained(tmp_path / "denoiser")
    assert (tmp_path / "denoiser" / "diffusion_pytorch_model.safetensors").exists()
    loaded = LatentDenoiser.from_pretrained(tmp_path / "denoiser").eval()
    assert loaded.config.class_names == ["neg", "pos"]
    x, t = torch.randn(2, N, D), torch.tensor([3, 300])
    torch.testing.assert_close(
        model(x, t, class_labels=torch.tensor([0, 1])).sample, loaded(x, t, class_labels=torch.tensor([0, 1])).sample
    )


def test_long_skips_are_used():
    model = randomise_output(tiny()).eval()
    x, t = torch.randn(2, N, D), torch.tensor([3, 300])
    before = model(x, t).sample
    with torch.no_grad():
        model.skip_projs[0].weight[:, 64:].mul_(2.0)  # the half that reads the skip
    assert not torch.allclose(before, model(x, t).sample)


def test_bf16_autocast_forward_backward():
    model = randomise_output(tiny(num_classes=2)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(model, make_noise_scheduler(), torch.randn(4, N, D), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_true_target_recovers_z0(schedule, prediction_type):
    scheduler = make_noise_scheduler(schedule, prediction_type, num_train_timesteps=1000)
    assert scheduler.config.clip_sample is False and scheduler.config.variance_type == "fixed_large"
    assert scheduler.config.prediction_type == prediction_type
    abar = scheduler.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()), "ᾱ must decrease strictly"
    assert abar[0] > 0.97 and abar[-1] < 1e-3

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1000, N, D, generator=g, dtype=torch.float64)
    noise = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    t = torch.arange(1000)
    z_t = scheduler.add_noise(z0, noise, t)
    target = diffusion_target(scheduler, z0, noise, t)
    torch.testing.assert_close(predict_original_sample(scheduler, target, z_t, t), z0, rtol=0, atol=1e-8)
    # The scheduler's own step agrees with our conversion (it computes the same ẑ0 internally).
    scheduler.set_timesteps(50)
    step_t = scheduler.timesteps[10]
    out = scheduler.step(target[step_t : step_t + 1], step_t, z_t[step_t : step_t + 1])
    torch.testing.assert_close(out.pred_original_sample, z0[step_t : step_t + 1], rtol=0, atol=1e-6)


def test_schedule_shapes_differ_and_shift():
    abar = {s: make_noise_scheduler(s).alphas_cumprod for s in SCHEDULES}
    mid = 500
    # sqrt noises fastest early; shifted cosine is noisier than cosine at every t.
    assert abar["sqrt"][50] < abar["cosine"][50]
    assert bool((abar["shifted_cosine"][1:-1] < abar["cosine"][1:-1]).all())
    more = make_noise_scheduler("shifted_cosine", shift=4.0).alphas_cumprod
    assert more[mid] < abar["shifted_cosine"][mid]
    with pytest.raises(ValueError, match="Unknown noise schedule"):
        make_noise_scheduler("exponential")
    with pytest.raises(ValueError, match="Unknown prediction_type"):
        make_noise_scheduler("cosine", "mu")
    assert make_noise_scheduler("cosine", "v").config.prediction_type == "v_prediction"
    assert make_noise_scheduler(timestep_spacing="leading").config.timestep_spacing == "leading"


def test_predict_original_sample_other_schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddpm = make_noise_scheduler("cosine", "epsilon")
    z0, noise, t = torch.randn(3, N, D), torch.randn(3, N, D), torch.tensor([10, 400, 800])
    z_t = ddpm.add_noise(z0, noise, t)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        other = cls.from_config(ddpm.config)
        torch.testing.assert_close(predict_original_sample(other, noise, z_t, t), z0, atol=1e-4, rtol=1e-4)
    # Fractional timesteps interpolate between neighbours.
    half = predict_original_sample(ddpm, noise, z_t, t.double() + 0.5)
    assert half.shape == z0.shape and torch.isfinite(half).all()


# ---------------------------------------------------------------- objective


def test_loss_is_reproducible_with_generator():
    model = randomise_output(tiny(num_classes=2)).train()
    sched = make_noise_scheduler()
    z, y = torch.randn(8, N, D), torch.tensor([0, 1] * 4)
    a = diffusion_loss(model, sched, z, y, generator=torch.Generator().manual_seed(3))
    b = diffusion_loss(model, sched, z, y, generator=torch.Generator().manual_seed(3))
    c = diffusion_loss(model, sched, z, y, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() and a.item() != c.item()
    per = diffusion_loss(model, sched, z, y, generator=torch.Generator().manual_seed(3), reduction="none")
    assert per.shape == (8,)
    torch.testing.assert_close(per.mean(), a)


def test_self_conditioning_first_pass_is_no_grad(monkeypatch):
    model = randomise_output(tiny()).train()
    calls = []
    original = model.forward

    def spy(sample, timestep, self_cond=None, class_labels=None, return_dict=True):
        calls.append((torch.is_grad_enabled(), self_cond is None))
        return original(sample, timestep, self_cond=self_cond, class_labels=class_labels, return_dict=return_dict)

    monkeypatch.setattr(model, "forward", spy)
    diffusion_loss(model, make_noise_scheduler(), torch.randn(4, N, D), self_conditioning_prob=1.0)
    assert calls == [(False, True), (True, False)]
    calls.clear()
    diffusion_loss(model, make_noise_scheduler(), torch.randn(4, N, D), self_conditioning_prob=0.0)
    assert calls == [(True, True)]


def test_label_dropout_goes_to_null_class(monkeypatch):
    model = tiny(num_classes=3).train()
    seen = []
    original = model.forward

    def spy(sample, timestep, self_cond=None, class_labels=None, return_dict=True):
        seen.append(class_labels.clone())
        return original(sample, timestep, self_cond=self_cond, class_labels=class_labels, return_dict=return_dict)

    monkeypatch.setattr(model, "forward", spy)
    labels = torch.zeros(2000, dtype=torch.long)
    diffusion_loss(
        model,
        make_noise_scheduler(),
        torch.randn(2000, N, D),
        labels,
        self_conditioning_prob=0.0,
        label_dropout_prob=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    dropped = (seen[0] == 3).float().mean().item()
    assert set(seen[0].unique().tolist()) == {0, 3} and 0.07 < dropped < 0.13
    seen.clear()
    diffusion_loss(
        model,
        make_noise_scheduler(),
        torch.randn(8, N, D),
        labels[:8],
        self_conditioning_prob=0.0,
        label_dropout_prob=0.0,
    )
    assert bool((seen[0] == 0).all())


def test_loss_targets_and_l1():
    model = tiny().train()  # zero output => loss = mean(target^2) or mean(|target|)
    z = torch.randn(16, N, D)
    for prediction_type in PREDICTION_TYPES:
        sched = make_noise_scheduler("cosine", prediction_type)
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (16,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        expected = diffusion_target(sched, z, noise, t).square().mean()
        got = diffusion_loss(model, sched, z, self_conditioning_prob=0.0, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, expected)
    l1 = diffusion_loss(model, make_noise_scheduler("cosine", "sample"), z, self_conditioning_prob=0.0, loss_type="l1")
    torch.testing.assert_close(l1, z.abs().mean())


def test_objective_bad_input():
    model = tiny(num_classes=2)
    sched = make_noise_scheduler()
    with pytest.raises(ValueError, match="do not fit the denoiser"):
        diffusion_loss(model, sched, torch.randn(2, N, D + 1))
    with pytest.raises(ValueError, match="class labels must lie"):
        diffusion_loss(model, sched, torch.randn(2, N, D), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unconditional"):
        diffusion_loss(tiny(), sched, torch.randn(2, N, D), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="self_conditioning=False"):
        diffusion_loss(tiny(self_conditioning=False), sched, torch.randn(2, N, D))
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_loss(model, sched, torch.randn(2, N, D), loss_type="huber")


def test_importance_sampler():
    sampler = TimestepImportanceSampler(10, ema_decay=0.5, uniform_prob=0.1)
    torch.testing.assert_close(sampler.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    t = torch.arange(10)
    sampler.update(t, torch.where(t < 5, torch.tensor(4.0), torch.tensor(1.0)))
    assert sampler.warmed_up
    p = sampler.probabilities()
    assert abs(p.sum().item() - 1) < 1e-12 and p[0] > p[9]
    # High-loss timesteps are drawn more often; weights undo the bias exactly in expectation.
    ts, w = sampler.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (ts < 5).float().mean() > 0.6
    torch.testing.assert_close(w.double().mean(), torch.tensor(1.0, dtype=torch.float64), atol=0.03, rtol=0)
    restored = TimestepImportanceSampler(10)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), p)
    with pytest.raises(ValueError, match="timesteps"):
        TimestepImportanceSampler(11).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("schedule", ["cosine", "linear", "sqrt", "shifted_cosine"])
def test_a_noise_floor_keeps_every_step_noisy_and_the_schedule_falling(schedule):
    from latentlm.diffusion import make_noise_scheduler

    plain = make_noise_scheduler(schedule).alphas_cumprod.double()
    floored = make_noise_scheduler(schedule, noise_floor=0.3).alphas_cumprod.double()
    assert float((1 - floored[0]).sqrt()) == pytest.approx(0.3, abs=1e-6)  # the first step at the floor
    assert bool((floored[1:] < floored[:-1]).all())  # and every later one noisier
    assert float(floored[-1]) == pytest.approx(float(plain[-1]), abs=1e-6)  # the same last step
    # a level the plain schedule reaches at step t comes at an earlier step, not later
    assert bool((floored <= plain + 1e-7).all())
    with pytest.raises(ValueError, match="noise_floor must lie in"):
        make_noise_scheduler(schedule, noise_floor=1.0)


def test_a_multistep_solver_samples_finite_latents_on_a_noise_floor():
    from diffusers import DPMSolverMultistepScheduler
    from latentlm.diffusion import make_noise_scheduler

    solver = DPMSolverMultistepScheduler.from_config(make_noise_scheduler("cosine", noise_floor=0.25).config)
    solver.set_timesteps(25)
    latents = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    for t in solver.timesteps:
        latents = solver.step(0.5 * latents, t, latents).prev_sample
    assert bool(torch.isfinite(latents).all())


def test_the_adaptive_schedule_spaces_the_loss_evenly_and_keeps_its_ends():
    from latentlm.diffusion import make_noise_scheduler
    from latentlm.diffusion.schedules import adaptive_betas

    T = 1000
    base = make_noise_scheduler("adaptive").alphas_cumprod.double().numpy()
    t = np.arange(T)
    counts = np.ones(T)

    def refit(losses):
        return np.cumprod(1 - adaptive_betas(base, losses, counts))

    # a loss that rises evenly already: the schedule stays
    np.testing.assert_allclose(refit(t / T), base, rtol=2e-2, atol=1e-6)
    # a loss that changes only around t = 500: most new steps go there, the first and last levels stay
    fitted = refit(1 / (1 + np.exp(-(t - 500) / 30)))
    assert np.all(np.diff(fitted) <= 0)
    # (the last step may not reach ᾱ = 2e-9 in one step: betas are capped at 0.999, as diffusers' are)
    assert fitted[0] == pytest.approx(base[0], rel=1e-4) and fitted[-1] < 1e-3
    steep = (fitted <= base[440]) & (fitted >= base[560])
    assert steep.mean() > 0.6  # the old schedule spent 12 % of its steps there
    with pytest.raises(ValueError, match="at least half of its 50 timestep ranges"):
        adaptive_betas(base, t / T, np.where(t < 100, 1.0, 0.0))
    with pytest.raises(ValueError, match="one entry per timestep"):
        adaptive_betas(base, t[:10] / T, counts[:10])


def test_the_noise_floor_setting_is_checked():
    from latentlm.config import load_config

    assert load_config({"diffusion": {"noise_floor": 0.2}}).diffusion.noise_floor == 0.2
    with pytest.raises(ValueError, match=r"diffusion.noise_floor must lie in \[0, 1\)"):
        load_config({"diffusion": {"noise_floor": -0.1}})
