"""`RunConfig`: one run of `latentlm train`, its sections in the order the stages run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from latentlm.config.sections import (
    AutoencoderTrainingConfig,
    ClassifierTrainingConfig,
    DataConfig,
    DecoderTuningConfig,
    DiffusionTrainingConfig,
    TrackingConfig,
    TrainingLoopConfig,
)

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    output_dir: str = "outputs/latentlm"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    decoder_tuning: DecoderTuningConfig = field(default_factory=DecoderTuningConfig)
    diffusion: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    classifier: ClassifierTrainingConfig = field(default_factory=ClassifierTrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        """Each training stage's section checks its own values, then what sections decide together; the
        error names the key."""
        for section in fields(self):
            value = getattr(self, section.name)
            if isinstance(value, TrainingLoopConfig):
                value.validate(section.name)
        tuning = self.decoder_tuning
        reads_context = tuning.enabled and tuning.read_context
        if self.autoencoder.infill_generate_kwargs.get("encoder_no_repeat_ngram_size") and not reads_context:
            raise ValueError(
                "autoencoder.infill_generate_kwargs: encoder_no_repeat_ngram_size bans the n-grams of the context "
                "the decoder reads, and the pipeline's decoder reads none: enable decoder_tuning with read_context: "
                "true, or use no_repeat_ngram_size."
            )
