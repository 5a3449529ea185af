"""Stage 2 of latentlm: the latent denoiser, noise schedules and the diffusion training objective."""

from .modeling_latent_classifier import CLASSIFIER_TASKS, LatentClassifier, latent_fingerprint
from .modeling_latent_denoiser import DENOISER_SIZES, LatentDenoiser, LatentDenoiserOutput
from .objective import (
    LOSS_TYPES,
    TIMESTEP_SAMPLING,
    TimestepImportanceSampler,
    denoised_latents,
    diffusion_loss,
    diffusion_target,
)
from .schedules import (
    PREDICTION_TYPES,
    SCHEDULES,
    AdaptiveScheduleFitter,
    guide_model_output,
    make_noise_scheduler,
    model_output_from_original_sample,
    predict_original_sample,
)

__all__ = [
    "AdaptiveScheduleFitter",
    "CLASSIFIER_TASKS",
    "LatentClassifier",
    "guide_model_output",
    "latent_fingerprint",
    "DENOISER_SIZES",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "TIMESTEP_SAMPLING",
    "LatentDenoiser",
    "LatentDenoiserOutput",
    "TimestepImportanceSampler",
    "denoised_latents",
    "diffusion_loss",
    "diffusion_target",
    "make_noise_scheduler",
    "model_output_from_original_sample",
    "predict_original_sample",
]
