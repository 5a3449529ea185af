"""Which diffusers schedulers `LatentTextDiffusionPipeline` samples with, and the check it runs on one."""

from __future__ import annotations

import inspect

from latentlm.diffusion.schedules import PREDICTION_TYPES

__all__ = ["SUPPORTED_SCHEDULERS", "UNSUPPORTED_SCHEDULERS", "check_scheduler", "extra_step_kwargs"]

#: diffusers schedulers that sample well from a trained latent denoiser with the cosine schedule
#: (`benchmarks/scheduler_support.py`); build them with ``Cls.from_config(pipe.scheduler.config)``.
SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
#: schedulers that accept this pipeline's config but do not work with it, and why
UNSUPPORTED_SCHEDULERS = {
    "HeunDiscreteScheduler": (
        "its second-order correction amplifies the denoiser's error at the huge sigma_max of the cosine "
        "schedule, so samples diverge at usual step counts"
    ),
    "KDPM2AncestralDiscreteScheduler": "it diverges at 10 steps and fails with an IndexError at 5",
}


def check_scheduler(scheduler, prediction_type: str) -> None:
    """The scheduler must predict what the denoiser was trained for (``prediction_type``), be one that
    works with the cosine schedule, and work in alphas_cumprod."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"pipeline prediction_type={prediction_type!r}: use one of {PREDICTION_TYPES}.")
    name = type(scheduler).__name__
    scheduler_type = scheduler.config.get("prediction_type")
    if scheduler_type != prediction_type:
        raise ValueError(
            f"{name} has prediction_type={scheduler_type!r} but the denoiser was trained for {prediction_type!r}. "
            f"Build the scheduler from the pipeline's config, e.g. `pipe.scheduler = "
            f"{name}.from_config(pipe.scheduler.config)`, or pass prediction_type={prediction_type!r}."
        )
    if name in UNSUPPORTED_SCHEDULERS:
        raise ValueError(
            f"{name} is not supported by this pipeline: {UNSUPPORTED_SCHEDULERS[name]}. Use one of "
            f"{list(SUPPORTED_SCHEDULERS)}, e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)."
        )
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(
            f"{name} has no alphas_cumprod; use a DDPM-family scheduler (DDPM, DDIM, DPMSolverMultistep, UniPC, Euler ...)."
        )


def extra_step_kwargs(scheduler, generator) -> dict:
    """The generator for ``scheduler.step`` where it takes one (UniPC does not)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
