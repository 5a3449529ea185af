"""Latent classifiers for classifier guidance: `train_classifier(config, autoencoder_path)` trains a
`LatentClassifier` on the stage-1 latents of the training texts (the latent cache), noised at
timesteps drawn uniformly as in stage 2, in the shared loop (`latentlm.training.loop.run_stage`).

The target is a data column (``classifier.label_column``: a classification head) or the text's
length in tokens (``classifier.target: length``: a regression head). Accuracy (or mean absolute
error) on the validation texts at evenly spaced noise levels is logged and saved with the model
(``noise_levels.json``). The result is ``<output_dir>/classifiers/<name>``; `attach_classifier` adds
it to a pipeline folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from latentlm.config import RunConfig
from latentlm.data.labels import resolve_class_labels
from latentlm.data.loading import load_text_dataset
from latentlm.diffusion import LatentClassifier, latent_fingerprint, make_noise_scheduler
from latentlm.files import atomic_directory, refuse_pickled_weights
from latentlm.mlflow.tracking import Tracker
from latentlm.pipelines.pipeline_folder import CLASSIFIERS_DIR
from latentlm.training.encoder_cache import ENCODER_CACHE_DIR
from latentlm.training.latent_cache import build_latent_cache
from latentlm.training.loop import TrainingStage, run_stage
from latentlm.training.optimization import make_lr_scheduler, make_optimizer
from latentlm.training.precision import resolve_mixed_precision
from latentlm.training.stages.diffusion import CACHE_DIR, check_autoencoder_path

logger = logging.getLogger(__name__)

__all__ = ["train_classifier", "ClassifierStage", "attach_classifier", "TARGETS", "NOISE_LEVELS_FILE"]

#: derived regression targets: name -> what it measures
TARGETS = {"length": "tokens of the text (no special tokens)"}
NOISE_LEVELS_FILE = "noise_levels.json"


def _targets(config: RunConfig, split: str, max_samples: int | None, tokenizer):
    """(texts, targets, the dataset) of one split."""
    cfg, data = config.classifier, config.data
    ds = load_text_dataset(data, split, max_samples)
    texts = list(ds[data.text_column])
    if cfg.target == "length":
        return texts, [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]], ds
    if cfg.label_column not in ds.column_names:
        raise ValueError(
            f"classifier.label_column={cfg.label_column!r} is not a column of the {split!r} data; its columns "
            f"are {ds.column_names}."
        )
    return texts, list(ds[cfg.label_column]), ds


class ClassifierStage(TrainingStage):
    """A `LatentClassifier` on noised latents: cross-entropy for classes, MSE (normalised) for a number."""

    name = "classifier"

    def __init__(self, config: RunConfig, autoencoder_path: str | Path, cache_dir: str | Path | None = None):
        cfg = config.classifier
        if (cfg.label_column is None) == (cfg.target is None):
            raise ValueError(
                "a classifier needs exactly one of classifier.label_column (a data column to classify) or "
                f"classifier.target (one of {sorted(TARGETS)}), e.g. --label-column sentiment or --target length."
            )
        if cfg.target is not None and cfg.target not in TARGETS:
            raise ValueError(f"classifier.target={cfg.target!r}: use one of {sorted(TARGETS)}.")
        super().__init__(config, cfg)
        self.control = cfg.name or cfg.label_column or cfg.target
        self.final_dir = f"{CLASSIFIERS_DIR}/{self.control}"
        self.checkpoint_dir = f"classifier_training/{self.control}"
        self.history_file = f"classifier_{self.control}_history.json"
        self.autoencoder_path = check_autoencoder_path(autoencoder_path)
        self.cache_root = Path(cache_dir) if cache_dir is not None else self.autoencoder_path / CACHE_DIR

    def setup(self, accelerator) -> None:
        cfg, data, diffusion = self.cfg, self.config.data, self.config.diffusion
        text_autoencoder = TextAutoencoder.from_pretrained(self.autoencoder_path).to(accelerator.device)
        texts, raw, ds = _targets(self.config, data.train_split, data.max_train_samples, text_autoencoder.tokenizer)
        kwargs = self._head(raw)
        # The latents stage 2 cached (keyed by the texts and stage 2's class labels), encoded once.
        labels, names = None, None
        if data.label_column and data.label_column in ds.column_names:
            labels, names = resolve_class_labels(list(ds[data.label_column]), diffusion.denoiser.get("class_names"))
        # stage 2's precision as stage 2 resolved it on this machine, so its cache is found
        precision = resolve_mixed_precision(diffusion.mixed_precision, accelerator.device)
        cache_kwargs = dict(
            labels=labels,
            class_names=names,
            mixed_precision=precision,
            encoder_cache_dir=Path(self.config.output_dir) / ENCODER_CACHE_DIR,
        )
        if accelerator.is_main_process:  # the main process writes the cache, the others find it by its key
            self.cache = build_latent_cache(text_autoencoder, texts, self.cache_root, **cache_kwargs)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            self.cache = build_latent_cache(
                text_autoencoder, texts, self.cache_root, show_progress=False, **cache_kwargs
            )
        self.val_latents = self.val_targets = None
        if data.validation_split and accelerator.is_main_process:
            val_texts, val_raw, _ = _targets(
                self.config, data.validation_split, data.max_eval_samples, text_autoencoder.tokenizer
            )
            with torch.no_grad():
                self.val_latents = torch.cat(
                    [text_autoencoder.encode(val_texts[i : i + 64]).float().cpu() for i in range(0, len(val_texts), 64)]
                )
            self.val_targets = self._encode_targets(val_raw)
        self.scheduler = make_noise_scheduler(
            diffusion.schedule,
            diffusion.prediction_type,
            diffusion.num_train_timesteps,
            noise_floor=diffusion.noise_floor,
        )
        if diffusion.schedule == "adaptive":  # fitted by stage 2: read what it saved
            fitted = Path(self.config.output_dir) / "diffusion" / "scheduler"
            if not (fitted / "scheduler_config.json").is_file():
                raise FileNotFoundError(
                    f"diffusion.schedule=adaptive is fitted while stage 2 trains, and {fitted} has no "
                    "scheduler_config.json: train stage 2 in this output_dir before the classifier."
                )
            self.scheduler = type(self.scheduler).from_pretrained(fitted)
        self.model = LatentClassifier(
            num_latents=self.cache.num_latents,
            latent_dim=self.cache.latent_dim,
            target_name=self.control,
            autoencoder_fingerprint=latent_fingerprint(text_autoencoder.autoencoder),
            **kwargs,
            **cfg.classifier,
        ).to(accelerator.device)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg.optimizer)
        self.train_model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.modules = {"classifier": self.model}

    def _head(self, raw: list[Any]) -> dict[str, Any]:
        """The head's arguments from the training targets; sets ``self.targets`` (tensor per example)."""
        overrides = set(self.cfg.classifier) & {"task", "class_names", "target_mean", "target_std", "target_name"}
        if overrides:
            raise ValueError(f"classifier.classifier must not set {sorted(overrides)}: they come from the data.")
        if self.cfg.target is not None:
            values = np.asarray(raw, dtype=np.float64)
            self.targets = torch.tensor(values, dtype=torch.float32)
            return {"task": "regression", "target_mean": float(values.mean()), "target_std": float(values.std() or 1.0)}
        ids, self.class_names = resolve_class_labels(raw)
        if len(self.class_names) < 2:
            raise ValueError(
                f"classifier.label_column={self.cfg.label_column!r} has one class only: {self.class_names}."
            )
        self.targets = torch.tensor(ids, dtype=torch.long)
        return {"task": "classification", "class_names": self.class_names}

    def _encode_targets(self, raw: list[Any]) -> torch.Tensor:
        if self.cfg.target is not None:
            return torch.tensor(np.asarray(raw, dtype=np.float64), dtype=torch.float32)
        ids, _ = resolve_class_labels(raw, self.class_names)
        return torch.tensor(ids, dtype=torch.long)

    def fingerprint(self) -> str:
        from latentlm.training.checkpoints import run_fingerprint

        return run_fingerprint(
            self.cfg, self.config.data, self.config.diffusion.schedule, str(self.autoencoder_path.resolve())
        )

    def noised(self, z0: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return self.scheduler.add_noise(z0, noise, timesteps)

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        device = self.accelerator.device
        indices = self.batch_indices(step, len(self.cache))
        z0, _ = self.cache.batch(indices, device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
        z_t = self.noised(z0, timesteps.to(device), generator)
        target = self.targets[indices].to(device)
        with self.accelerator.autocast():
            out = self.train_model(z_t, timesteps.to(device)).float()
        if self.model.is_regression:
            normalised = (target - self.model.config.target_mean) / self.model.config.target_std
            return torch.nn.functional.mse_loss(out, normalised)
        return torch.nn.functional.cross_entropy(out, target)

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every if self.val_latents is not None else 0

    @property
    def evaluate_at_end(self) -> bool:
        return self.val_latents is not None

    @torch.no_grad()
    def noise_level_metrics(self) -> dict[str, float]:
        """Accuracy (classes) or mean absolute error (a number) on the validation latents at
        ``num_noise_levels`` evenly spaced timesteps, the noise drawn with a fixed seed."""
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(0)
        levels = np.linspace(0, self.scheduler.config.num_train_timesteps - 1, self.cfg.num_noise_levels).round()
        metrics = {}
        device = self.accelerator.device
        for level in levels.astype(int).tolist():
            t = torch.full((len(self.val_latents),), level, dtype=torch.long)
            z_t = self.noised(self.val_latents, t, generator).to(device)
            predicted = self.model.predict(z_t, t.to(device)).cpu()
            if self.model.is_regression:
                metrics[str(level)] = float((predicted - self.val_targets).abs().mean())
            else:
                metrics[str(level)] = float((predicted == self.val_targets).float().mean())
        self.model.train(was_training)
        return metrics

    def evaluate(self, step: int, tracker: Tracker) -> dict[str, Any]:
        metrics = self.noise_level_metrics()
        key = "mae" if self.model.is_regression else "accuracy"
        mean = float(np.mean(list(metrics.values())))
        tracker.log_metrics({f"eval/{key}": mean, **{f"eval/{key}_t{int(t):04d}": v for t, v in metrics.items()}}, step)
        logger.warning("step %d: %s %.3f over noise levels (t=0: %.3f)", step, key, mean, metrics["0"])
        return {key: mean, f"{key}_at_t": metrics}

    def params(self) -> dict[str, Any]:
        return {
            "classifier.control": self.control,
            "classifier.autoencoder_path": str(self.autoencoder_path),
            "classifier.num_train_examples": len(self.cache),
        }

    def save(self, folder: Path) -> None:
        self.accelerator.unwrap_model(self.train_model).save_pretrained(folder, safe_serialization=True)
        if self.val_latents is not None:
            key = "mae" if self.model.is_regression else "accuracy"
            (folder / NOISE_LEVELS_FILE).write_text(json.dumps({key: self.noise_level_metrics()}, indent=2))

    def summary(self) -> dict[str, Any]:
        return {"control": self.control, "latent_cache": str(self.cache.path)}


def train_classifier(
    config: RunConfig,
    autoencoder_path: str | Path,
    resume: bool = False,
    tracker: Tracker | None = None,
    *,
    cache_dir: str | Path | None = None,
    time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the classifier of ``config.classifier``; returns ``<output_dir>/classifiers/<name>``.

    ``autoencoder_path``: the trained `TextAutoencoder` whose latents the pipeline samples
    (``<output_dir>/autoencoder``); other arguments as in `latentlm.training.loop.run_stage`.
    """
    stage = ClassifierStage(config, autoencoder_path, cache_dir=cache_dir)
    return run_stage(stage, resume=resume, tracker=tracker, time_budget_s=time_budget_s, overwrite=overwrite)


def attach_classifier(pipeline_dir: str | Path, classifier_dir: str | Path, name: str | None = None) -> Path:
    """Copy a trained classifier into a saved pipeline folder (``classifiers/<name>``), after checking
    that it reads that pipeline's latents; returns its new folder."""
    from latentlm.autoencoder import LatentAutoencoder
    from latentlm.pipelines.classifier_guidance import check_classifier

    pipeline_dir, classifier_dir = Path(pipeline_dir), Path(classifier_dir)
    refuse_pickled_weights(classifier_dir)
    classifier = LatentClassifier.from_pretrained(classifier_dir)
    autoencoder = LatentAutoencoder.from_pretrained(pipeline_dir / "autoencoder")
    name = name or classifier_dir.name
    check_classifier(name, classifier, autoencoder.config.num_latents, autoencoder.config.latent_dim, autoencoder)
    final = pipeline_dir / CLASSIFIERS_DIR / name
    with atomic_directory(final) as tmp:
        classifier.save_pretrained(tmp, safe_serialization=True)
        if (classifier_dir / NOISE_LEVELS_FILE).is_file():
            (tmp / NOISE_LEVELS_FILE).write_text((classifier_dir / NOISE_LEVELS_FILE).read_text())
    return final
