"""Noise schedules from the literature as diffusers scheduler configs, and model-output -> ẑ0 conversion."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMScheduler

#: Schedules `make_noise_scheduler` knows. cosine/linear map to diffusers' own `beta_schedule`
#: names; sqrt and shifted_cosine have no diffusers name and are passed as `trained_betas`.
#: adaptive starts as cosine and is re-fitted to the loss during training (`adaptive_betas`).
SCHEDULES = ("cosine", "linear", "sqrt", "shifted_cosine", "adaptive")
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
    little there, and a sampler ending on them gains nothing). The timesteps are spread over the
    schedule's noise levels from the floor on: ᾱ'_t = ᾱ(t0 + t (T - 1 - t0) / (T - 1)), with ᾱ(t0) =
    1 - noise_floor² (interpolated), so the schedule keeps falling at every step; a flat start would
    give multistep solvers (DPM-Solver) steps of zero length, and NaN."""
    if not 0.0 < noise_floor < 1.0:
        raise ValueError(f"noise_floor must lie in (0, 1) (a noise std), got {noise_floor}.")
    cap, steps = 1.0 - noise_floor**2, np.arange(len(alphas_cumprod), dtype=np.float64)
    if alphas_cumprod[0] <= cap:  # every step is already that noisy
        return _betas_from_alphas_cumprod(alphas_cumprod)
    start = float(np.interp(cap, alphas_cumprod[::-1], steps[::-1]))  # ᾱ falls: reversed, it rises
    last = steps[-1]
    return _betas_from_alphas_cumprod(np.interp(start + steps * (last - start) / last, steps, alphas_cumprod))


def original_sample_losses(
    scheduler, losses: torch.Tensor, timesteps: torch.Tensor, loss_type: str = "l2"
) -> torch.Tensor:
    """Per-example losses `[batch]` of the scheduler's prediction type expressed as the error of the
    implied ẑ0: for v, ẑ0 - z0 = -√(1-ᾱ)(v̂ - v); for ε, -√((1-ᾱ)/ᾱ)(ε̂ - ε). This is the loss that
    rises with the noise level whatever the model predicts (`adaptive_betas` spaces it evenly)."""
    abar = scheduler.alphas_cumprod.to(losses.device, torch.float64)[timesteps.long()]
    scale = {"v_prediction": 1 - abar, "epsilon": (1 - abar) / abar, "sample": torch.ones_like(abar)}[
        _PREDICTION_ALIASES.get(scheduler.config.prediction_type, scheduler.config.prediction_type)
    ]
    return (losses.double() * (scale if loss_type == "l2" else scale.sqrt())).to(losses.dtype)


def adaptive_betas(
    alphas_cumprod: np.ndarray, mean_losses: np.ndarray, counts: np.ndarray, num_bins: int = 50
) -> np.ndarray:
    """SeqDiffuSeq's adaptive noise schedule (Yuan et al. 2022): the betas of a schedule on which the
    denoiser's ẑ0 loss rises evenly from the first timestep to the last.

    ``mean_losses[t]`` is the mean ẑ0 loss seen at train timestep ``t`` of the schedule ``alphas_cumprod``
    (``counts[t]`` examples; `original_sample_losses` converts a v or ε loss). The losses are averaged
    in ``num_bins`` equal ranges of timesteps and made non-decreasing in the noise; new timestep ``i``
    then gets the noise level at which that curve reaches the ``i``-th of T evenly spaced losses between
    its first and last value (interpolated in log-SNR). The first and last noise levels stay; steps
    move to where the loss changes fastest, away from levels that are all alike to the model.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(abar)
    mean_losses, counts = np.asarray(mean_losses, np.float64), np.asarray(counts, np.float64)
    if mean_losses.shape != (T,) or counts.shape != (T,):
        raise ValueError(f"mean_losses and counts must have one entry per timestep ({T}).")
    if not 2 <= num_bins <= T:
        raise ValueError(f"num_bins must lie in [2, {T}], got {num_bins}.")
    edges = np.linspace(0, T, num_bins + 1).round().astype(int)
    centres, losses = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = counts[lo:hi].sum()
        if n > 0:
            seen = counts[lo:hi] > 0
            centres.append(float(np.average(np.arange(lo, hi)[seen], weights=counts[lo:hi][seen])))
            losses.append(float(np.average(mean_losses[lo:hi][seen], weights=counts[lo:hi][seen])))
    if len(centres) < num_bins // 2 or not np.isfinite(losses).all():
        raise ValueError(
            f"an adaptive schedule needs finite losses in at least half of its {num_bins} timestep ranges; "
            f"{len(centres)} were seen: record more steps before fitting."
        )
    curve = np.maximum.accumulate(np.asarray(losses))
    # a tiny ramp makes the knots strictly increasing where the curve is flat, as np.interp needs
    curve = curve + np.linspace(0.0, 1e-9 * max(curve[-1] - curve[0], 1e-12), len(curve))
    # the first and last timesteps are knots too, their losses extrapolated along the nearest two bins
    tiny = 1e-9 * max(curve[-1] - curve[0], 1e-12)
    first = curve[0] - (curve[1] - curve[0]) / (centres[1] - centres[0]) * centres[0]
    last = curve[-1] + (curve[-1] - curve[-2]) / (centres[-1] - centres[-2]) * (T - 1 - centres[-1])
    knots_t = np.concatenate([[0.0], centres, [T - 1.0]])
    knots_loss = np.concatenate([[min(first, curve[0] - tiny)], curve, [max(last, curve[-1] + tiny)]])
    targets = np.linspace(knots_loss[0], knots_loss[-1], T)
    old_t = np.interp(targets, knots_loss, knots_t)  # where the old schedule reached each target loss
    log_snr = np.log(abar) - np.log1p(-abar)
    new_abar = 1.0 / (1.0 + np.exp(-np.interp(old_t, np.arange(T), log_snr)))
    return _betas_from_alphas_cumprod(np.minimum.accumulate(new_abar))


class AdaptiveScheduleFitter:
    """Records the ẑ0 loss per train timestep while stage 2 trains and re-fits the noise schedule to it
    (`adaptive_betas`): the `adaptive` schedule of `make_noise_scheduler`, SeqDiffuSeq's recipe."""

    def __init__(self, num_train_timesteps: int, num_bins: int = 50):
        self.num_bins = min(num_bins, num_train_timesteps)
        self.loss_sums = np.zeros(num_train_timesteps, dtype=np.float64)
        self.counts = np.zeros(num_train_timesteps, dtype=np.float64)

    @torch.no_grad()
    def update(self, scheduler, timesteps: torch.Tensor, losses: torch.Tensor, loss_type: str = "l2") -> None:
        """Record per-example training losses `[batch]` (of the scheduler's prediction type) at `timesteps`."""
        x0_losses = original_sample_losses(
            scheduler, losses.detach().double().cpu(), timesteps.detach().cpu(), loss_type
        )
        t = timesteps.detach().long().cpu().numpy()
        np.add.at(self.loss_sums, t, x0_losses.numpy())
        np.add.at(self.counts, t, 1.0)

    def fit(self, scheduler) -> DDPMScheduler:
        """A scheduler like ``scheduler`` on the re-fitted betas; the record starts again (its losses
        were measured on the old schedule)."""
        seen = np.maximum(self.counts, 1.0)
        betas = adaptive_betas(
            scheduler.alphas_cumprod.double().numpy(), self.loss_sums / seen, self.counts, self.num_bins
        )
        self.loss_sums[:] = 0.0
        self.counts[:] = 0.0
        return DDPMScheduler.from_config(scheduler.config, trained_betas=betas.tolist())

    def state_dict(self) -> dict[str, list[float]]:
        return {"loss_sums": self.loss_sums.tolist(), "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        if len(state["loss_sums"]) != len(self.loss_sums):
            raise ValueError(
                f"Adaptive-schedule state is for {len(state['loss_sums'])} timesteps, this run uses {len(self.loss_sums)}."
            )
        self.loss_sums = np.asarray(state["loss_sums"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.float64)


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
            `sqrt` (Diffusion-LM), `shifted_cosine` (cosine with SNR divided by `shift**2`) or
            `adaptive` (cosine, which training re-fits with `adaptive_betas`).
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
    if schedule in ("cosine", "adaptive"):
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


def _prediction_type_of(scheduler, prediction_type: str | None) -> str:
    """``prediction_type`` (default: the scheduler's) by its full name; an unknown one is an error."""
    name = prediction_type or scheduler.config.prediction_type
    name = _PREDICTION_ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {name!r}; choose one of {PREDICTION_TYPES}.")
    return name


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
    prediction_type = _prediction_type_of(scheduler, prediction_type)
    abar = _alphas_cumprod_at(scheduler, timesteps, sample)
    out = model_output.double()
    z_t = sample.double()
    if prediction_type == "v_prediction":
        z0 = abar.sqrt() * z_t - (1 - abar).sqrt() * out
    elif prediction_type == "epsilon":
        z0 = (z_t - (1 - abar).sqrt() * out) / abar.sqrt()
    else:  # "sample"
        z0 = out
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
    prediction_type = _prediction_type_of(scheduler, prediction_type)
    abar = _alphas_cumprod_at(scheduler, timesteps, sample)
    a, sigma = abar.sqrt(), (1 - abar).sqrt()
    out, z_t = model_output.double(), sample.double()
    if prediction_type == "v_prediction":  # v = a ε - σ z0, z_t = a z0 + σ ε
        eps = a * out + sigma * z_t
    elif prediction_type == "epsilon":
        eps = out
    else:  # "sample"
        eps = (z_t - a * out) / sigma
    # Weighted by ᾱ: the shift of the implied clean latent, σ²/√ᾱ · ∇ log p, would explode where ᾱ -> 0
    # (a classifier is at chance there anyway); with the weight it is at most σ²√ᾱ · ∇ log p.
    eps = eps - abar * sigma * grad_log_prob.double()
    z0 = (z_t - sigma * eps) / a
    guided = {"v_prediction": a * eps - sigma * z0, "epsilon": eps, "sample": z0}[prediction_type]
    return guided.to(model_output.dtype)


def model_output_from_original_sample(
    scheduler,
    original_sample: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor | int | float,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """The denoiser output (v, ε or ẑ0) that `predict_original_sample` maps to ``original_sample`` at
    z_t = ``sample``: what a scheduler steps with once ẑ0 was changed outside the model (clamped).

    Args as in `predict_original_sample`; returns the output in ``original_sample``'s dtype.
    """
    prediction_type = _prediction_type_of(scheduler, prediction_type)
    abar = _alphas_cumprod_at(scheduler, timesteps, sample)
    a, sigma = abar.sqrt(), (1 - abar).sqrt()
    z0, z_t = original_sample.double(), sample.double()
    eps = (z_t - a * z0) / sigma
    output = {"v_prediction": a * eps - sigma * z0, "epsilon": eps, "sample": z0}[prediction_type]
    return output.to(original_sample.dtype)


__all__ = [
    "AdaptiveScheduleFitter",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "adaptive_betas",
    "cosine_alphas_cumprod",
    "guide_model_output",
    "make_noise_scheduler",
    "model_output_from_original_sample",
    "original_sample_losses",
    "predict_original_sample",
    "shifted_cosine_betas",
    "sqrt_betas",
]
