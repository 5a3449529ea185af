"""Pipelines: `LatentTextDiffusionPipeline` (diffusers `DiffusionPipeline`) and its output dataclass."""

from latentlm.pipelines.pipeline_latent_text_diffusion import (
    LatentTextDiffusionPipeline,
    LatentTextDiffusionPipelineOutput,
)

__all__ = ["LatentTextDiffusionPipeline", "LatentTextDiffusionPipelineOutput"]
