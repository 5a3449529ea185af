"""Stage 2 training: learn the latent denoiser on a trained autoencoder's latents.

`train_diffusion(config, autoencoder_path)` loads the training texts (and labels, and for
text-to-text the source texts of ``data.source_column``), encodes them once into a memory-mapped
latent cache (`latentlm.training.latent_cache`), and trains a `LatentDenoiser`
with the LD4LG objective (`latentlm.diffusion.diffusion_loss`) in the shared loop
(`latentlm.training.loop.run_stage`), with an EMA of the weights (diffusers `EMAModel`). Every
``sample_every`` steps a few decoded samples per class go to MLflow as a table. The result is
``<output_dir>/diffusion`` with ``denoiser/`` (EMA weights) and ``scheduler/``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from latentlm.autoencoder.text_autoencoder_folder import CONFIG_NAME as AUTOENCODER_CONFIG_NAME
from latentlm.config import RunConfig
from latentlm.data.labels import load_training_examples, resolve_class_labels, warn_unseen_validation_classes
from latentlm.diffusion import (
    DENOISER_SIZES,
    AdaptiveScheduleFitter,
    LatentDenoiser,
    TimestepImportanceSampler,
    diffusion_loss,
    make_noise_scheduler,
)
from latentlm.mlflow.tracking import Tracker
from latentlm.training.batching import class_balanced_order
from latentlm.training.checkpoints import run_fingerprint
from latentlm.training.encoder_cache import ENCODER_CACHE_DIR
from latentlm.training.latent_cache import build_latent_cache
from latentlm.training.latent_context import DenoiserContext
from latentlm.training.loop import TrainingStage, run_stage
from latentlm.training.optimization import make_lr_scheduler, make_optimizer

logger = logging.getLogger(__name__)

__all__ = ["train_diffusion", "DiffusionStage", "build_denoiser", "check_autoencoder_path"]

FINAL_DIR = "diffusion"
CHECKPOINT_DIR = "diffusion_training"
HISTORY_FILE = "diffusion_history.json"
CACHE_DIR = "latent_cache"

_DENOISER_ARGS = set(inspect.signature(LatentDenoiser.__init__).parameters) - {"self"}


def check_autoencoder_path(autoencoder_path: str | Path) -> Path:
    path = Path(autoencoder_path)
    if not (path / AUTOENCODER_CONFIG_NAME).is_file():
        if (path / "autoencoder" / AUTOENCODER_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is a stage-1 run folder; pass its autoencoder folder {str(path / 'autoencoder')!r}."
            )
        raise FileNotFoundError(
            f"No trained autoencoder at {str(path)!r} ({AUTOENCODER_CONFIG_NAME} is missing). Run "
            "`latentlm train-autoencoder --config ...` first and pass its <output_dir>/autoencoder folder "
            "(or a folder written by TextAutoencoder.save_pretrained)."
        )
    return path


def build_denoiser(
    config: RunConfig, num_latents: int, latent_dim: int, class_names: list[str], cross_attention_dim: int | None = None
) -> LatentDenoiser:
    """The denoiser of ``config.diffusion`` for latents ``[N, D]``, these classes and (text-to-text) source
    states of width ``cross_attention_dim`` (validated)."""
    cfg = config.diffusion
    if cfg.denoiser_size not in DENOISER_SIZES:
        raise ValueError(f"diffusion.denoiser_size={cfg.denoiser_size!r}: use one of {sorted(DENOISER_SIZES)}.")
    overrides = dict(cfg.denoiser)
    unknown = sorted(set(overrides) - _DENOISER_ARGS)
    if unknown:
        raise ValueError(f"Unknown diffusion.denoiser keys {unknown}; valid keys: {sorted(_DENOISER_ARGS)}.")
    for key, actual in (("num_latents", num_latents), ("latent_dim", latent_dim)):
        if key in overrides and overrides[key] != actual:
            raise ValueError(
                f"Latent shape mismatch: diffusion.denoiser.{key}={overrides[key]} but the autoencoder produces "
                f"latents of shape [{num_latents}, {latent_dim}]. Remove the override (it is taken from the "
                "autoencoder) or use the autoencoder it was meant for."
            )
    if "num_classes" in overrides and overrides["num_classes"] != len(class_names):
        raise ValueError(
            f"diffusion.denoiser.num_classes={overrides['num_classes']} but the data have {len(class_names)} "
            f"classes {class_names}; remove num_classes (it is taken from the data)."
        )
    if overrides.get("cross_attention_dim", cross_attention_dim) != cross_attention_dim:
        raise ValueError(
            f"diffusion.denoiser.cross_attention_dim={overrides['cross_attention_dim']} but the source states have "
            f"width {cross_attention_dim} ({'no data.source_column' if cross_attention_dim is None else 'the encoder'}"
            "); remove it (it is taken from the data and the autoencoder)."
        )
    overrides.update(
        cross_attention_dim=cross_attention_dim,
        num_latents=num_latents,
        latent_dim=latent_dim,
        num_classes=len(class_names),
        class_names=list(class_names) or None,
    )
    overrides.setdefault("self_conditioning", cfg.self_conditioning_prob > 0)
    return LatentDenoiser.from_size(cfg.denoiser_size, **overrides)


class DiffusionStage(TrainingStage):
    """Stage 2: the LD4LG diffusion loss of a `LatentDenoiser` over cached latents, with EMA weights."""

    name = "diffusion"
    final_dir, checkpoint_dir, history_file = FINAL_DIR, CHECKPOINT_DIR, HISTORY_FILE

    def __init__(self, config: RunConfig, autoencoder_path: str | Path, cache_dir: str | Path | None = None):
        super().__init__(config, config.diffusion)
        self.autoencoder_path = check_autoencoder_path(autoencoder_path)
        self.cache_root = Path(cache_dir) if cache_dir is not None else self.autoencoder_path / CACHE_DIR

    def setup(self, accelerator) -> None:
        cfg, opt = self.cfg, self.cfg.optimizer
        # data and classes, validated before anything expensive
        texts, raw_labels, self.sources = load_training_examples(self.config.data)
        labels, self.class_names = resolve_class_labels(raw_labels, cfg.denoiser.get("class_names"))
        if cfg.balance_classes and labels is None:
            raise ValueError(
                "diffusion.balance_classes=true needs class labels: set data.label_column, or turn it off."
            )
        warn_unseen_validation_classes(self.config.data, self.class_names)

        # latents, encoded once (main process), then memory-mapped by every process
        self.text_autoencoder = TextAutoencoder.from_pretrained(self.autoencoder_path)
        if accelerator.is_main_process:
            self.text_autoencoder.to(accelerator.device)  # encodes the cache here, decodes samples later
        else:
            accelerator.wait_for_everyone()  # the main process writes the cache; the others find it by its key
        tick = time.perf_counter()
        self.cache = build_latent_cache(
            self.text_autoencoder,
            texts,
            self.cache_root,
            labels=labels,
            class_names=self.class_names,
            show_progress=accelerator.is_main_process,
            sources=self.sources,
            mixed_precision=accelerator.mixed_precision,
            encoder_cache_dir=Path(self.config.output_dir) / ENCODER_CACHE_DIR,
        )
        self.cache_seconds = time.perf_counter() - tick  # only the key's hashing when a cache was reused
        # positions of batches -> examples; None: every example once per epoch
        self.example_order = class_balanced_order(self.cache.labels, cfg.seed) if cfg.balance_classes else None
        if accelerator.is_main_process:
            accelerator.wait_for_everyone()
        else:
            self.text_autoencoder = None  # only the main process decodes samples

        # what each example reads as its context: its source's states, or its document's other latents
        self.context = DenoiserContext(self.cache, self.config.data)
        self.denoiser = build_denoiser(
            self.config, self.cache.num_latents, self.cache.latent_dim, self.class_names, self.context.width
        )
        self.denoiser.to(accelerator.device)
        self.scheduler = make_noise_scheduler(
            cfg.schedule, cfg.prediction_type, cfg.num_train_timesteps, noise_floor=cfg.noise_floor
        )
        self.optimizer = make_optimizer(self.denoiser.parameters(), opt)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, opt)
        self.train_model, self.optimizer = accelerator.prepare(self.denoiser, self.optimizer)
        # EMA warm-up (decay 1 - (1 + step)^-2/3, capped at ema_decay): short runs still get a useful average.
        self.ema = EMAModel(
            self.denoiser.parameters(),
            decay=cfg.ema_decay,
            use_ema_warmup=True,
            foreach=True,
            model_cls=LatentDenoiser,
            model_config=self.denoiser.config,
        )
        self.importance = (
            TimestepImportanceSampler(cfg.num_train_timesteps) if cfg.timestep_sampling == "importance" else None
        )
        self.schedule_fitter = AdaptiveScheduleFitter(cfg.num_train_timesteps) if cfg.schedule == "adaptive" else None
        self.modules = {"denoiser": self.denoiser}

    def fingerprint(self) -> str:
        return run_fingerprint(self.cfg, self.config.data, str(self.autoencoder_path.resolve()))

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        cfg, accelerator = self.cfg, self.accelerator
        if self.example_order is None:
            indices = self.batch_indices(step, len(self.cache))
        else:
            indices = [self.example_order[i] for i in self.batch_indices(step, len(self.example_order))]
        latents, labels = self.cache.batch(indices, accelerator.device)
        states, mask = self.context.batch(indices, accelerator.device)
        self.timesteps = weights = None
        if self.importance is not None:
            self.timesteps, weights = self.importance.sample(len(indices), accelerator.device, generator=generator)
        elif self.schedule_fitter is not None:  # the fitter records the loss per timestep: draw them here
            self.timesteps = torch.randint(0, cfg.num_train_timesteps, (len(indices),), generator=generator).to(
                accelerator.device
            )
        with accelerator.autocast():
            self.losses = diffusion_loss(
                self.train_model,
                self.scheduler,
                latents,
                labels,
                self_conditioning_prob=cfg.self_conditioning_prob,
                label_dropout_prob=cfg.label_dropout_prob,
                loss_type=cfg.loss_type,
                timesteps=self.timesteps,
                generator=generator,
                reduction="none",
                encoder_hidden_states=states,
                encoder_attention_mask=mask,
                source_dropout_prob=cfg.source_dropout_prob if states is not None else 0.0,
            )
        return (self.losses * weights).mean() if weights is not None else self.losses.mean()

    def after_step(self, step: int) -> dict[str, float]:
        if self.importance is not None or self.schedule_fitter is not None:
            gathered_t = self.accelerator.gather(self.timesteps)
            gathered_losses = self.accelerator.gather(self.losses.detach().float())
        if self.importance is not None:
            self.importance.update(gathered_t, gathered_losses)
        if self.schedule_fitter is not None:
            self.schedule_fitter.update(self.scheduler, gathered_t, gathered_losses, self.cfg.loss_type)
            if (step + 1) % self.cfg.adaptive_schedule_every == 0:
                self.scheduler = self.schedule_fitter.fit(self.scheduler)
        return {"ema_decay": self.ema.cur_decay_value or 0.0}

    @property
    def eval_every(self) -> int:
        return self.cfg.sample_every

    def evaluate(self, step: int, tracker: Tracker) -> dict[str, Any]:
        """A few decoded samples per class (text-to-text: for the first training sources), with the EMA
        weights (what is saved)."""
        from latentlm.sampling import sample_per_class

        with self.ema_weights():
            rows = sample_per_class(
                self.pipeline(),
                self.cfg.num_samples_per_class,
                num_inference_steps=self.cfg.sample_inference_steps,
                scheduler="ddim",
                seed=self.cfg.seed,
                source_texts=self.sources[: self.cfg.num_samples_per_class] if self.sources else None,
            )
        rows = [{**row, "class": row["class"] if row["class"] is not None else ""} for row in rows]
        tracker.log_table([{"step": step, **row} for row in rows], f"samples/step_{step:08d}.json")
        return {"samples": rows[: 2 * max(1, len(self.class_names))]}

    def pipeline(self):
        """The pipeline of the autoencoder and the denoiser as it is now (for samples during training)."""
        from latentlm.pipelines import LatentTextDiffusionPipeline

        ae = self.text_autoencoder
        pipe = LatentTextDiffusionPipeline(
            tokenizer=ae.tokenizer,
            language_model=ae.language_model,
            autoencoder=ae.autoencoder,
            denoiser=self.denoiser,
            scheduler=self.scheduler,
            max_length=ae.max_length,
            decode_kwargs=self.config.autoencoder.generate_kwargs or None,
            segments=self.config.data.segments,
            segment_context=self.config.data.segment_context,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the denoiser (in eval mode) for the duration; the training weights after."""
        self.ema.store(self.denoiser.parameters())
        self.ema.copy_to(self.denoiser.parameters())
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            yield
        finally:
            self.denoiser.train(was_training)
            self.ema.restore(self.denoiser.parameters())

    def params(self) -> dict[str, Any]:
        return {
            "diffusion.autoencoder_path": str(self.autoencoder_path),
            "diffusion.latent_cache": str(self.cache.path),
            "diffusion.num_train_examples": len(self.cache),
            "diffusion.class_names": ",".join(self.class_names) or "(unconditional)",
            "diffusion.source_column": self.config.data.source_column or "(none)",
            "diffusion.num_parameters": sum(p.numel() for p in self.denoiser.parameters()),
        }

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.importance is not None:
            state["importance"] = {k: v.tolist() for k, v in self.importance.state_dict().items()}
        if self.schedule_fitter is not None:
            state["adaptive_schedule"] = {
                "betas": self.scheduler.config.trained_betas,  # None until the first fit
                **self.schedule_fitter.state_dict(),
            }
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.schedule_fitter is not None and "adaptive_schedule" in state:
            saved = state["adaptive_schedule"]
            if saved["betas"] is not None:
                self.scheduler = type(self.scheduler).from_config(self.scheduler.config, trained_betas=saved["betas"])
            self.schedule_fitter.load_state_dict(saved)
        if self.importance is not None and "importance" in state:
            saved = state["importance"]  # JSON lists; float64 so the loss history is restored bit for bit
            self.importance.load_state_dict(
                {
                    "loss_sq_ema": torch.tensor(saved["loss_sq_ema"], dtype=torch.float64),
                    "seen": torch.tensor(saved["seen"], dtype=torch.bool),
                }
            )

    def save(self, folder: Path) -> None:
        # The EMA weights are the model (LD4LG samples with them).
        with self.ema_weights():
            self.accelerator.unwrap_model(self.train_model).save_pretrained(
                folder / "denoiser", safe_serialization=True
            )
        self.scheduler.save_pretrained(folder / "scheduler")

    def summary(self) -> dict[str, Any]:
        return {
            "latent_cache": str(self.cache.path),
            "latent_cache_s": round(self.cache_seconds, 1),
            "class_names": self.class_names,
        }


def train_diffusion(
    config: RunConfig,
    autoencoder_path: str | Path,
    resume: bool = False,
    tracker: Tracker | None = None,
    *,
    cache_dir: str | Path | None = None,
    time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Train stage 2 as configured; returns ``<output_dir>/diffusion`` (``denoiser/`` + ``scheduler/``).

    Args:
        autoencoder_path: a trained `TextAutoencoder` folder (``<output_dir>/autoencoder`` of stage 1).
        cache_dir: where latent caches live (default ``<autoencoder_path>/latent_cache``, so every
            later run on the same autoencoder and data reuses it).
        resume, overwrite, tracker, time_budget_s: as in `latentlm.training.loop.run_stage`.
    """
    stage = DiffusionStage(config, autoencoder_path, cache_dir=cache_dir)
    return run_stage(stage, resume=resume, tracker=tracker, time_budget_s=time_budget_s, overwrite=overwrite)
