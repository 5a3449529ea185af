"""latentlm: latent diffusion language models (LD4LG-style) on diffusers, transformers and peft.

Public names are imported lazily, so ``import latentlm`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LatentAutoencoder": "latentlm.autoencoder",
    "LatentDenoiser": "latentlm.diffusion",
    "LatentClassifier": "latentlm.diffusion",
    "make_noise_scheduler": "latentlm.diffusion",
    "LatentTextDiffusionPipeline": "latentlm.pipelines",
    "LatentTextDiffusionPipelineOutput": "latentlm.pipelines",
    "TextAutoencoder": "latentlm.autoencoder.text_autoencoder",
    "load_backbone": "latentlm.autoencoder.backbones",
    "RunConfig": "latentlm.config",
    "load_config": "latentlm.config",
    "Tracker": "latentlm.mlflow.tracking",
    "train_autoencoder": "latentlm.training.stages.autoencoder",
    "train_diffusion": "latentlm.training.stages.diffusion",
    "train_classifier": "latentlm.training.stages.classifier",
    "train": "latentlm.training.run",
    "sample": "latentlm.sampling",
    "evaluate": "latentlm.evaluation.protocol",
    "evaluate_autoencoder": "latentlm.evaluation.reconstruction",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
