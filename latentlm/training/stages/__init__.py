"""The training stages, one file each, and `STAGES`: the registry that `latentlm train`, the
``latentlm train-*`` commands and the end-to-end run loop over.

A stage is a `latentlm.training.loop.TrainingStage` (its folders, setup, step, evaluation and saving)
and a function ``train_x(config, *folders_it_reads, resume=, tracker=, time_budget_s=, overwrite=)``
that runs it; its settings are the ``RunConfig`` section of its name. A new stage is one file and
one line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["STAGES", "StageSpec"]


def _nothing(config) -> tuple[str, ...]:
    return ()


def _always(config) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One training stage, as the end-to-end run and the command line see it."""

    name: str  # its RunConfig section, its MLflow run and its TrainingStage.name
    label: str  # how logs and errors call it
    entry_point: str  # "module:function" of its train function (imported when it runs)
    stage_class: str  # the TrainingStage class in the same module (its folders)
    reads: Callable[[Any], tuple[str, ...]] = _nothing  # the earlier stages whose folders it trains on, in order
    enabled: Callable[[Any], bool] = _always  # whether `latentlm train` runs it for a config
    end_to_end: bool = True  # a step of `latentlm train`
    command: str | None = None  # its own `latentlm` command
    help: str = ""

    def _attribute(self, name: str):
        module = self.entry_point.partition(":")[0]
        return getattr(importlib.import_module(module), name)

    @property
    def function(self) -> Callable:
        return self._attribute(self.entry_point.partition(":")[2])

    @property
    def training_stage(self) -> type:
        return self._attribute(self.stage_class)


def _tuning_reads(config) -> tuple[str, ...]:
    return ("autoencoder", "diffusion") if config.decoder_tuning.latent_source == "denoiser" else ("autoencoder",)


_STAGE_LIST = (
    StageSpec(
        "autoencoder",
        "Stage 1",
        "latentlm.training.stages.autoencoder:train_autoencoder",
        "AutoencoderStage",
        command="train-autoencoder",
        help="stage 1: train the latent text autoencoder",
    ),
    StageSpec(
        "decoder_tuning",
        "Decoder tuning",
        "latentlm.training.stages.decoder_tuning:tune_decoder",
        "DecoderTuningStage",
        reads=_tuning_reads,
        enabled=lambda config: config.decoder_tuning.enabled,
    ),
    StageSpec(
        "diffusion",
        "Stage 2",
        "latentlm.training.stages.diffusion:train_diffusion",
        "DiffusionStage",
        reads=lambda config: ("autoencoder",),
        command="train-diffusion",
        help="stage 2: train the latent denoiser on a trained autoencoder",
    ),
    StageSpec(
        "classifier",
        "Latent classifier",
        "latentlm.training.stages.classifier:train_classifier",
        "ClassifierStage",
        reads=lambda config: ("autoencoder",),
        end_to_end=False,
        command="train-classifier",
        help="a latent classifier for classifier guidance (a control)",
    ),
)
#: every training stage by name, in the order `latentlm train` runs them (a stage runs once the
#: stages it reads have run: the decoder tuning on the denoiser's predictions waits for stage 2)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in _STAGE_LIST}
