"""Noise schedules from the literature as diffusers scheduler configs, and model-output -> ẑ0 conversion."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMScheduler

#: Schedules `make_noise_scheduler` knows. cosine/linear map to diffusers' own `beta_schedule`
#: names; sqrt and shifted_cosine have no diffusers name and are passed as `trained_betas`.
SCHEDULES = ("cosine", "linear", "sqrt", "shifted_cosine")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
_PREDICTION_ALIASES = {"v": "v_prediction", "eps": "epsilon", "x0": "sample", "x_0": "sample"}

# A beta of 1 would make ᾱ exactly 0 and the ε -> x0 conversion divide by zero; diffusers and
# Diffusion-LM cap it at 0.999 for the same reason.
_MAX_BETA = 0.999


def _betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return np.clip(1.0 - alphas_cumprod / prev, 0.0, _MAX_BETA)


def sqrt_betas(num_train_timesteps: int, s: float = 1e-4) -> np.ndarray:
    """Diffusion-LM's sqrt schedule ᾱ(t) = 1 - sqrt(t/T + s), discretised as Diffusion-LM does
    (β_i = 1 - ᾱ((i+1)/T) / ᾱ(i/T), capped at 0.999). It adds noise fast at small t, which suits
    embeddings/latents that are robust to small perturbations."""
    T = num_train_timesteps

    def alpha_bar(t: float) -> float:
        return 1.0 - math.sqrt(t + s)

    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), _MAX_BETA) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


def cosine_alphas_cumprod(num_train_timesteps: int, s: float = 0.008) -> np.ndarray:
    """ᾱ of the (Improved DDPM) cosine schedule exactly as diffusers' `squaredcos_cap_v2` builds it."""
    T = num_train_timesteps

    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = np.asarray([min(1 - f((i + 1) / T) / f(i / T), _MAX_BETA) for i in range(T)], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def shifted_cosine_betas(num_train_timesteps: int, shift: float = 2.0) -> np.ndarray:
    """Cosine schedule with its log-SNR shifted by -2·log(shift) (simple diffusion, Hoogeboom et al. 2023).

    SNR'(t) = SNR(t) / shift², i.e. ᾱ' = ᾱ / (ᾱ + shift²(1 - ᾱ)). shift > 1 noises more at every t,
    which long latent sequences (more redundant dimensions) need for the same effective difficulty.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    abar = cosine_alphas_cumprod(num_train_timesteps)
    shifted = abar / (abar + shift**2 * (1.0 - abar))
    return _betas_from_alphas_cumprod(shifted)


def floored_betas(alphas_cumprod: np.ndarray, noise_floor: float) -> np.ndarray:
    """The betas of a schedule whose noise std ``sqrt(1 - ᾱ_t)`` never falls below ``noise_floor``
    (DINOISER, Ye et al. 2023: the smallest noise levels are trivial to undo, so the model learns
    little there, and a sampler ending on them gains nothing): ᾱ'_t = min(ᾱ_t, 1 - noise_floor²)."""
    if not 0.0 < noise_floor < 1.0:
        raise ValueError(f"noise_floor must lie in (0, 1) (a noise std), got {noise_floor}.")
    return _betas_from_alphas_cumprod(np.minimum(alphas_cumprod, 1.0 - noise_floor**2))


def make_noise_scheduler(
    schedule: str = "cosine",
    prediction_type: str = "v_prediction",
    num_train_timesteps: int = 1000,
    *,
    shift: float = 2.0,
    noise_floor: float = 0.0,
    **kw,
) -> DDPMScheduler:
    """A `DDPMScheduler` for latent diffusion with one of the field's noise schedules.

    Args:
        schedule: `cosine` (default, diffusers `squaredcos_cap_v2`), `linear` (DDPM, scaled to T),
            `sqrt` (Diffusion-LM) or `shifted_cosine` (cosine with SNR divided by `shift**2`).
        prediction_type: `v_prediction` (default), `epsilon` or `sample` (aliases v, eps, x0).
        num_train_timesteps: T.
        shift: only for `shifted_cosine`.
        noise_floor: with any schedule, the least noise std of every step (`floored_betas`; 0 = none).
        **kw: any other `DDPMScheduler` argument (e.g. `timestep_spacing`), overriding our defaults.

    Defaults that matter: `clip_sample=False` (diffusers' default True clips latents to [-1, 1]),
    `variance_type="fixed_large"` (as LD4LG), `timestep_spacing="trailing"` (sampling starts at
    the last training step, where the model has learned to start from pure noise).

    ε-prediction caveat: near t = T the cosine schedule's ᾱ is ~1e-9, so ẑ0 = (z_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)
    multiplies the model's ε error by up to ~2e4; few-step sampling from the last step then diverges
    unless the model is very accurate. Prefer v_prediction (default) or sample, or sample an ε model
    with `timestep_spacing="leading"`.
    """
    prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown noise schedule {schedule!r}; choose one of {SCHEDULES}.")

    args: dict = dict(
        num_train_timesteps=num_train_timesteps,
        prediction_type=prediction_type,
        clip_sample=False,
        variance_type="fixed_large",
        timestep_spacing="trailing",
    )
    if schedule == "cosine":
        args["beta_schedule"] = "squaredcos_cap_v2"
    elif schedule == "linear":
        # DDPM's 1e-4 .. 0.02 were chosen for T=1000; scaling by 1000/T keeps ᾱ_T the same for other T.
        scale = 1000 / num_train_timesteps
        args.update(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=min(0.02 * scale, _MAX_BETA))
    elif schedule == "sqrt":
        args["trained_betas"] = sqrt_betas(num_train_timesteps).tolist()
    else:
        args["trained_betas"] = shifted_cosine_betas(num_train_timesteps, shift).tolist()
    if noise_floor:
        base = DDPMScheduler(**{k: v for k, v in args.items() if k not in ("prediction_type",)})
        args.pop("beta_schedule", None), args.pop("beta_start", None), args.pop("beta_end", None)
        args["trained_betas"] = floored_betas(base.alphas_cumprod.double().numpy(), noise_floor).tolist()
    args.update(kw)
    return DDPMScheduler(**args)


def _alphas_cumprod_at(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at (possibly fractional) train timesteps, broadcastable to `like` ([B] -> [B, 1, 1])."""
    abar = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float64)
    t = torch.as_tensor(timesteps, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.is_floating_point():
        # Some schedulers (Euler with linspace spacing) use fractional timesteps: interpolate ᾱ.
        t = t.double().clamp(0, len(abar) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(abar) - 1)
        w = t - lo.double()
        a = abar[lo] * (1 - w) + abar[hi] * w
    else:
        a = abar[t.long()]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def predict_original_sample(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor | int | float,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """Convert a denoiser output to ẑ0 for any prediction type (used for self-conditioning).

    Args:
        scheduler: any diffusers scheduler with `alphas_cumprod` (DDPM, DDIM, DPM-Solver, UniPC, Euler).
        model_output: v, ε or ẑ0 `[batch, num_latents, latent_dim]`.
        sample: the variance-preserving noisy latents z_t that the denoiser saw (for Euler-type
            schedulers that is the output of `scale_model_input`, not the unscaled sample).
        timesteps: `[batch]` or scalar train timesteps (fractional ones are interpolated).
        prediction_type: defaults to `scheduler.config.prediction_type`.
    Returns:
        ẑ0 `[batch, num_latents, latent_dim]`, in `model_output`'s dtype.
    """
    prediction_type = _PREDICTION_ALIASES.get(
        prediction_type or scheduler.config.prediction_type, prediction_type or scheduler.config.prediction_type
    )
    abar = _alphas_cumprod_at(scheduler, timesteps, sample)
    out = model_output.double()
    z_t = sample.double()
    if prediction_type == "v_prediction":
        z0 = abar.sqrt() * z_t - (1 - abar).sqrt() * out
    elif prediction_type == "epsilon":
        z0 = (z_t - (1 - abar).sqrt() * out) / abar.sqrt()
    elif prediction_type == "sample":
        z0 = out
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")
    return z0.to(model_output.dtype)


def guide_model_output(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor | int | float,
    grad_log_prob: torch.Tensor,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """Classifier guidance: shift the model's score by ``grad_log_prob`` = ∇_{z_t} log p(y | z_t).

    With z_t = √ᾱ z0 + √(1-ᾱ) ε the score is -ε / √(1-ᾱ), so adding the gradient to the score means
    ε' = ε - √(1-ᾱ) · ∇ log p(y | z_t) (Dhariwal & Nichol 2021, eq. 14). Here the gradient is weighted
    by ᾱ_t: ε' = ε - ᾱ √(1-ᾱ) ∇ log p. Unweighted, the implied clean estimate moves by
    (1-ᾱ)/√ᾱ · ∇ log p, which explodes as ᾱ -> 0 (the first steps of a few-step sampler), and the
    self-conditioning input and multistep solvers carry that error on; the weight bounds the move by
    (1-ᾱ)√ᾱ · ∇ log p and leaves low-noise steps, where classifiers are reliable, as they are. The
    result is in the model's own parametrisation (v, ε or ẑ0), so any scheduler steps with it as usual.
    """
    prediction_type = _PREDICTION_ALIASES.get(
        prediction_type or scheduler.config.prediction_type, prediction_type or scheduler.config.prediction_type
    )
    abar = _alphas_cumprod_at(scheduler, timesteps, sample)
    a, sigma = abar.sqrt(), (1 - abar).sqrt()
    out, z_t = model_output.double(), sample.double()
    if prediction_type == "v_prediction":  # v = a ε - σ z0, z_t = a z0 + σ ε
        eps = a * out + sigma * z_t
    elif prediction_type == "epsilon":
        eps = out
    elif prediction_type == "sample":
        eps = (z_t - a * out) / sigma
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")
    # Weighted by ᾱ: the shift of the implied clean latent, σ²/√ᾱ · ∇ log p, would explode where ᾱ -> 0
    # (a classifier is at chance there anyway); with the weight it is at most σ²√ᾱ · ∇ log p.
    eps = eps - abar * sigma * grad_log_prob.double()
    z0 = (z_t - sigma * eps) / a
    guided = {"v_prediction": a * eps - sigma * z0, "epsilon": eps, "sample": z0}[prediction_type]
    return guided.to(model_output.dtype)


__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULES",
    "cosine_alphas_cumprod",
    "guide_model_output",
    "make_noise_scheduler",
    "predict_original_sample",
    "shifted_cosine_betas",
    "sqrt_betas",
]
