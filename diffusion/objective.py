"""The LD4LG training objective: noising, targets, self-conditioning, CFG label dropout, timestep sampling."""

from __future__ import annotations

import torch

from .modeling_latent_denoiser import checked_class_labels
from .schedules import predict_original_sample

LOSS_TYPES = ("l2", "l1")
#: how training draws timesteps: uniformly, or by `TimestepImportanceSampler`
TIMESTEP_SAMPLING = ("uniform", "importance")


def _rand(shape, generator: torch.Generator | None, device, kind: str = "rand") -> torch.Tensor:
    # Draw on the generator's device (a CPU generator also drives GPU runs), then move.
    gen_device = generator.device if generator is not None else device
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=gen_device).to(device)


class TimestepImportanceSampler:
    """Importance sampling of timesteps by loss history (Improved DDPM's loss-second-moment resampler).

    Keeps an EMA of the squared loss per timestep and samples t with p_t ∝ sqrt(E[L_t²]), mixed with
    a uniform floor; the returned weights 1 / (T p_t) keep the weighted loss an unbiased estimate of
    the uniform objective. Until every timestep has been seen once, sampling is uniform.
    """

    def __init__(self, num_train_timesteps: int, ema_decay: float = 0.99, uniform_prob: float = 0.1):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in (0, 1], got {uniform_prob}.")
        self.num_train_timesteps = num_train_timesteps
        self.ema_decay = ema_decay
        self.uniform_prob = uniform_prob
        self.loss_sq_ema = torch.zeros(num_train_timesteps, dtype=torch.float64)
        self.seen = torch.zeros(num_train_timesteps, dtype=torch.bool)

    @property
    def warmed_up(self) -> bool:
        return bool(self.seen.all())

    def probabilities(self) -> torch.Tensor:
        """p_t `[num_train_timesteps]` (float64, sums to 1)."""
        T = self.num_train_timesteps
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
        if not self.warmed_up:
            return uniform
        w = self.loss_sq_ema.sqrt()
        if not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
            return uniform
        return (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob * uniform

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """Returns (timesteps `[batch]` long, weights `[batch]` float32) on `device`."""
        p = self.probabilities()
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_train_timesteps * p.to(gen_device)[t])
        return t.to(device), weights.float().to(device)

    @torch.no_grad()
    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses `[batch]` observed at `timesteps` `[batch]`."""
        t = timesteps.detach().long().cpu()
        sq = losses.detach().double().cpu() ** 2
        for ti, li in zip(t.tolist(), sq.tolist()):
            if self.seen[ti]:
                self.loss_sq_ema[ti] = self.ema_decay * self.loss_sq_ema[ti] + (1 - self.ema_decay) * li
            else:
                self.loss_sq_ema[ti] = li
                self.seen[ti] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_sq_ema": self.loss_sq_ema.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["loss_sq_ema"].shape != (self.num_train_timesteps,):
            raise ValueError(
                f"Importance-sampler state is for {state['loss_sq_ema'].shape[0]} timesteps, "
                f"this run uses {self.num_train_timesteps}."
            )
        self.loss_sq_ema = state["loss_sq_ema"].double().clone()
        self.seen = state["seen"].bool().clone()


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser must predict for the scheduler's `prediction_type`: v, ε or z0 `[B, N, D]`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}: use v_prediction, epsilon or sample.")


def _drop_labels(class_labels, num_classes: int, batch: int, dropout_prob: float, generator, device):
    """Validated class labels `[batch]`, each replaced by the null class with probability ``dropout_prob``."""
    if class_labels is None:
        return None
    if num_classes == 0:
        raise ValueError("Class labels were given but the denoiser is unconditional (num_classes=0).")
    class_labels = checked_class_labels(
        class_labels,
        batch,
        num_classes,
        device,
        lambda labels: (
            f"class labels must lie in [0, {num_classes - 1}] (or {num_classes} = unlabelled), "
            f"got {sorted(set(labels.tolist()))}."
        ),
    )
    if dropout_prob > 0:
        drop = _rand((batch,), generator, device) < dropout_prob
        class_labels = torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)
    return class_labels


def _drop_sources(
    encoder_hidden_states, encoder_attention_mask, cross_attention_dim, batch, dropout_prob, generator, device
):
    """The source mask `[batch, L]` with each row zeroed (= no source) with probability ``dropout_prob``."""
    if cross_attention_dim is None:
        if encoder_hidden_states is not None:
            raise ValueError(
                "Source states were given but the denoiser has no cross-attention (cross_attention_dim=None)."
            )
        return None
    if encoder_hidden_states is None:
        raise ValueError(
            "This denoiser reads a source (cross_attention_dim is set) but no source states were given; "
            "pass encoder_hidden_states (and encoder_attention_mask)."
        )
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
    if dropout_prob > 0:
        keep = _rand((batch,), generator, device) >= dropout_prob
        encoder_attention_mask = encoder_attention_mask * keep[:, None].to(encoder_attention_mask.dtype)
    return encoder_attention_mask


def _check_loss_arguments(
    cfg, latents, loss_type, reduction, self_conditioning_prob, label_dropout_prob, source_dropout_prob
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    for name, p in (
        ("self_conditioning_prob", self_conditioning_prob),
        ("label_dropout_prob", label_dropout_prob),
        ("source_dropout_prob", source_dropout_prob),
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}.")
    if latents.ndim != 3 or latents.shape[1:] != (cfg.num_latents, cfg.latent_dim):
        raise ValueError(
            f"Latents of shape {tuple(latents.shape)} do not fit the denoiser, which expects "
            f"[batch, {cfg.num_latents}, {cfg.latent_dim}]: build the denoiser with the autoencoder's "
            "num_latents and latent_dim."
        )
    if self_conditioning_prob > 0 and not cfg.self_conditioning:
        raise ValueError(
            "self_conditioning_prob > 0 but the denoiser was built with self_conditioning=False; "
            "set self_conditioning_prob=0 or build the denoiser with self_conditioning=True."
        )


def diffusion_loss(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    self_conditioning_prob: float = 0.5,
    label_dropout_prob: float = 0.1,
    loss_type: str = "l2",
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    source_dropout_prob: float = 0.0,
) -> torch.Tensor:
    """One LD4LG training loss.

    Args:
        denoiser: a `LatentDenoiser` (or a DDP/accelerate wrapper of one).
        scheduler: a diffusers scheduler with `add_noise` / `get_velocity` (see `make_noise_scheduler`).
        latents: clean latents z0 `[batch, num_latents, latent_dim]`.
        class_labels: `[batch]` long in `[0, num_classes]` (num_classes = null / unlabelled) or None.
        self_conditioning_prob: probability that this batch first runs a no-grad pass whose ẑ0 is fed
            back as self-conditioning (one coin per batch, as in LD4LG: the skipped passes are saved).
        label_dropout_prob: probability that a label is replaced by the null class (CFG training).
        loss_type: `l2` (default) or `l1`.
        timesteps: `[batch]` train timesteps; default uniform over `[0, num_train_timesteps)`.
        generator: drives every random choice (noise, t, coins), so a seeded step is reproducible.
        reduction: `mean` (scalar) or `none` (`[batch]`, e.g. for importance-sampling weights).
        encoder_hidden_states, encoder_attention_mask: the source's encoder states `[batch, L, C]` and
            mask `[batch, L]` (text-to-text denoisers, which require them).
        source_dropout_prob: probability that an example's source is dropped (the null context: CFG on
            the source).
    """
    model = denoiser.module if hasattr(denoiser, "module") else denoiser  # unwrap DDP for the config
    cfg = model.config
    _check_loss_arguments(
        cfg, latents, loss_type, reduction, self_conditioning_prob, label_dropout_prob, source_dropout_prob
    )
    batch, device = latents.shape[0], latents.device
    class_labels = _drop_labels(class_labels, cfg.num_classes, batch, label_dropout_prob, generator, device)
    source_mask = _drop_sources(
        encoder_hidden_states,
        encoder_attention_mask,
        cfg.get("cross_attention_dim"),
        batch,
        source_dropout_prob,
        generator,
        device,
    )
    # The source goes in only when there is one, so denoisers without cross-attention keep their signature.
    condition = {"class_labels": class_labels}
    if source_mask is not None:
        condition.update(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=source_mask)

    T = scheduler.config.num_train_timesteps
    if timesteps is None:
        gen_device = generator.device if generator is not None else device
        timesteps = torch.randint(0, T, (batch,), generator=generator, device=gen_device).to(device)
    timesteps = torch.as_tensor(timesteps, device=device).long()
    noise = _rand(latents.shape, generator, device, kind="randn").to(latents.dtype)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)

    self_cond = None
    if self_conditioning_prob > 0 and float(_rand((), generator, device)) < self_conditioning_prob:
        with torch.no_grad():
            first = denoiser(noisy, timesteps, self_cond=None, **condition).sample
            self_cond = predict_original_sample(scheduler, first.float(), noisy, timesteps).detach()

    pred = denoiser(noisy, timesteps, self_cond=self_cond, **condition).sample
    err = pred.float() - target.float()
    per_example = (err.square() if loss_type == "l2" else err.abs()).mean(dim=(1, 2))
    return per_example.mean() if reduction == "mean" else per_example


@torch.no_grad()
def denoised_latents(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    noise_levels: tuple[float, float] = (0.0, 1.0),
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoiser's ẑ0 for ``latents`` noised to a level t/T drawn per example from ``noise_levels``:
    a first pass, then a second one self-conditioned on it, as the sampler's steps are. These are the
    latents a decoder tuned after stage 2 learns to write from (the kind of error samples carry).
    A text-to-text or segment denoiser reads each example's context (``encoder_hidden_states`` and
    ``encoder_attention_mask``, as in `diffusion_loss`); without it, the null context."""
    low, high = noise_levels
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"noise_levels must satisfy 0 <= low <= high <= 1, got {noise_levels}.")
    batch, device = latents.shape[0], latents.device
    T = scheduler.config.num_train_timesteps
    fractions = low + (high - low) * _rand((batch,), generator, device)
    timesteps = (fractions * (T - 1)).round().long()
    noise = _rand(latents.shape, generator, device, kind="randn").to(latents.dtype)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    self_cond = None
    model = denoiser.module if hasattr(denoiser, "module") else denoiser
    for _ in range(2 if model.config.get("self_conditioning", True) else 1):
        output = denoiser(
            noisy,
            timesteps,
            self_cond=self_cond,
            class_labels=class_labels,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        ).sample
        self_cond = predict_original_sample(scheduler, output.float(), noisy, timesteps)
    return self_cond.to(latents.dtype)


__all__ = ["LOSS_TYPES", "TimestepImportanceSampler", "denoised_latents", "diffusion_loss", "diffusion_target"]
