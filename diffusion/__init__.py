"""Stage 2 of latentlm: the latent denoiser, noise schedules and the diffusion training objective."""

from .modeling_latent_denoiser import DENOISER_SIZES, LatentDenoiser, LatentDenoiserOutput
from .objective import LOSS_TYPES, TIMESTEP_SAMPLING, TimestepImportanceSampler, diffusion_loss, diffusion_target
from .schedules import PREDICTION_TYPES, SCHEDULES, make_noise_scheduler, predict_original_sample

__all__ = [
    "DENOISER_SIZES",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "TIMESTEP_SAMPLING",
    "LatentDenoiser",
    "LatentDenoiserOutput",
    "TimestepImportanceSampler",
    "diffusion_loss",
    "diffusion_target",
    "make_noise_scheduler",
    "predict_original_sample",
]
