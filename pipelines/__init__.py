"""Pipelines: `LatentTextDiffusionPipeline` (diffusers `DiffusionPipeline`), its output dataclass, and the
`SamplingOptions` every caller passes whole.

Names are imported lazily, so that reading `SamplingOptions` (the command line does) does not load
torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LatentTextDiffusionPipeline": "latentlm.pipelines.pipeline_latent_text_diffusion",
    "LatentTextDiffusionPipelineOutput": "latentlm.pipelines.pipeline_output",
    "SCHEDULERS": "latentlm.pipelines.sampling_options",
    "SamplingOptions": "latentlm.pipelines.sampling_options",
    "make_scheduler": "latentlm.pipelines.sampling_options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentlm.pipelines' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
