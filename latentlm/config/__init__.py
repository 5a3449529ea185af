"""Run configuration: YAML files map one to one onto these dataclasses.

```yaml
output_dir: outputs/my-run
data: {path: my_texts.jsonl, text_column: text, label_column: sentiment}
autoencoder: {model: {backbone: facebook/bart-base, num_latents: 32}, optimizer: {max_steps: 50000}}
diffusion: {denoiser_size: base, schedule: cosine}
tracking: {experiment_name: latentlm}
```

Every key is checked: a misspelt key is an error that lists the valid ones, never silently ignored.
Command-line overrides use dotted paths: ``autoencoder.optimizer.max_steps=200``.
"""

from __future__ import annotations

from latentlm.config.autoencoder_model import AutoencoderModelConfig, CausalSettings, LoraSettings
from latentlm.config.loading import load_config, nest_model_keys
from latentlm.config.run_config import RunConfig
from latentlm.config.sections import (
    DECODER_LATENT_SOURCES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    AutoencoderTrainingConfig,
    ClassifierTrainingConfig,
    DataConfig,
    DecoderTuningConfig,
    DiffusionTrainingConfig,
    OptimizerConfig,
    TrackingConfig,
    TrainingLoopConfig,
)

__all__ = [
    "DECODER_LATENT_SOURCES",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "AutoencoderModelConfig",
    "AutoencoderTrainingConfig",
    "CausalSettings",
    "ClassifierTrainingConfig",
    "DataConfig",
    "DecoderTuningConfig",
    "DiffusionTrainingConfig",
    "LoraSettings",
    "OptimizerConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainingLoopConfig",
    "load_config",
    "nest_model_keys",
]
