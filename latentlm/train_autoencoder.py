"""Stage 1 training: learn the latent autoencoder (and optionally tune the decoder).

`train_autoencoder(config)` loads the data, caches the frozen encoder's states once, and trains in
the shared loop (`latentlm.training.run_stage`): reconstruction BLEU / exact match every
``eval_every`` steps, atomic checkpoints, MLflow; the result is a `TextAutoencoder` folder,
``<output_dir>/autoencoder``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch

from latentlm.autoencoder.adapters import set_dropout
from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from latentlm.autoencoder.text_codec import source_length_limit
from latentlm.config import AutoencoderTrainingConfig, RunConfig, TrainingLoopConfig
from latentlm.data import load_texts
from latentlm.encoder_cache import ENCODER_CACHE_DIR, build_encoder_cache
from latentlm.optimization import make_lr_scheduler, make_optimizer
from latentlm.reconstruction import evaluate_reconstruction
from latentlm.tracking import Tracker
from latentlm.training import TrainingStage, attention_kernel, run_stage

logger = logging.getLogger(__name__)

__all__ = [
    "train_autoencoder",
    "AutoencoderStage",
    "model_kwargs",
    "load_initial_autoencoder",
    "tune_decoder",
    "DecoderTuningStage",
    "decoder_tuning_config",
]

FINAL_DIR = "autoencoder"
CHECKPOINT_DIR = "autoencoder_training"
HISTORY_FILE = "autoencoder_history.json"
DECODER_DIR = "decoder"
DECODER_CHECKPOINT_DIR = "decoder_training"
DECODER_HISTORY_FILE = "decoder_history.json"

#: the keyword arguments of `TextAutoencoder.from_backbone`: config fields of the same names feed them
MODEL_ARGS = tuple(
    name
    for name, p in inspect.signature(TextAutoencoder.from_backbone).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def model_kwargs(cfg: AutoencoderTrainingConfig) -> dict[str, Any]:
    """The ``autoencoder:`` config fields that are `TextAutoencoder.from_backbone` arguments."""
    return {name: getattr(cfg, name) for name in MODEL_ARGS}


def load_initial_autoencoder(cfg: AutoencoderTrainingConfig) -> TextAutoencoder:
    """The model stage 1 starts from: a new one over ``cfg.backbone``, or the trained folder
    ``cfg.init_from`` (checked against the config's model keys, trainable, with the config's
    training settings), its compression network frozen when ``cfg.freeze_compression``."""
    if not cfg.init_from:
        return TextAutoencoder.from_backbone(cfg.backbone, **model_kwargs(cfg))
    model = TextAutoencoder.from_pretrained(
        cfg.init_from, trainable=True, latent_noise_std=cfg.latent_noise_std, alignment_weight=cfg.alignment_weight
    )
    saved = model.autoencoder.config
    built = {
        "backbone": TextAutoencoder.stored_backbone(cfg.backbone),
        "decoder": cfg.decoder,
        "max_length": cfg.max_length,
        "causal_memory": cfg.causal_memory,
        "context_positions": cfg.max_length if cfg.context_positions == -1 else cfg.context_positions,
        **{
            key: getattr(cfg, key)
            for key in (
                "num_latents",
                "latent_dim",
                "num_compression_layers",
                "num_reconstruction_layers",
                "head_dim",
                "ff_mult",
                "dropout",
                "query_init_std",
                "memory_tokens_per_latent",
                "tokens_per_query",
                "context_layers",
            )
        },
    }
    have = {
        "backbone": model.backbone,
        "decoder": model.decoder_mode,
        "max_length": model.max_length,
        "causal_memory": "key_value_prefix" if saved.key_value_layers else "soft_prompt",
        **{key: saved[key] for key in built if key in saved},
    }
    if model.decoder_mode == "lora":
        for key in ("r", "alpha", "dropout", "target_modules"):
            built[f"lora_{key}"], have[f"lora_{key}"] = getattr(cfg, f"lora_{key}"), model.lora.get(key)
    for key in ("normalize_latents", "prompt_template"):  # None in the config: the backbone's default
        if getattr(cfg, key) is not None:
            built[key], have[key] = getattr(cfg, key), saved[key]
    differ = [key for key in built if built[key] != have[key]]
    if differ:
        raise ValueError(
            f"autoencoder.init_from={cfg.init_from!r} was built with "
            + ", ".join(f"{key}={have[key]!r}" for key in differ)
            + ", but the config asks for "
            + ", ".join(f"{key}={built[key]!r}" for key in differ)
            + ". A trained autoencoder keeps its architecture: set these config values to the folder's "
            "(or leave init_from unset to build a new autoencoder)."
        )
    if cfg.plm_dropout is not None:
        set_dropout(model.language_model, cfg.plm_dropout)
    if cfg.freeze_compression:
        for p in model.autoencoder.compression_parameters():
            p.requires_grad_(False)
    return model


class AutoencoderStage(TrainingStage):
    """Stage 1: the reconstruction loss of a `TextAutoencoder` over cached frozen-encoder states."""

    name = "autoencoder"
    final_dir, checkpoint_dir, history_file = FINAL_DIR, CHECKPOINT_DIR, HISTORY_FILE

    def __init__(self, config: RunConfig, stage_config: AutoencoderTrainingConfig | None = None):
        super().__init__(config, stage_config or config.autoencoder)

    def setup(self, accelerator) -> None:
        cfg, opt, data = self.cfg, self.cfg.optimizer, self.config.data
        is_main = accelerator.is_main_process
        # data first, so bad input fails before any model is built
        self.train_texts = load_texts(data, data.train_split, data.max_train_samples)
        self.val_texts = load_texts(data, data.validation_split, data.max_eval_samples) if data.validation_split else []
        if opt.batch_size > len(self.train_texts) and is_main:
            logger.warning(
                "batch_size %d exceeds the %d training texts; batches repeat texts.",
                opt.batch_size,
                len(self.train_texts),
            )

        self.model = model = load_initial_autoencoder(cfg)
        model.to(accelerator.device)
        limit = source_length_limit(model.tokenizer, model.language_model)
        if limit is not None and cfg.max_length > limit:
            raise ValueError(
                f"autoencoder.max_length={cfg.max_length} exceeds the {limit} positions the backbone "
                f"{cfg.backbone!r} reads; set max_length to at most {limit}."
            )
        lengths = [len(ids) for ids in model.token_ids(self.train_texts, truncation=False)]
        self.num_truncated = sum(n > cfg.max_length for n in lengths)
        if is_main:
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            logger.warning(
                "%d of %d training texts (%.1f%%) are longer than max_length=%d tokens and are truncated "
                "(the longest, %d tokens: %r).",
                self.num_truncated,
                len(self.train_texts),
                100 * self.num_truncated / len(self.train_texts),
                cfg.max_length,
                lengths[longest],
                self.train_texts[longest][:80],
            )
        # the encoder states, computed once (main process) and memory-mapped by every process; the
        # decoder tuning and stage 2's latent cache find them under the same output_dir
        if not is_main:
            accelerator.wait_for_everyone()
        tick = time.perf_counter()
        self.cache = build_encoder_cache(
            model,
            self.train_texts,
            Path(self.config.output_dir) / ENCODER_CACHE_DIR,
            mixed_precision=accelerator.mixed_precision,
            show_progress=is_main,
        )
        self.cache_seconds = time.perf_counter() - tick  # only the key's hashing when a cache was reused
        if is_main:
            accelerator.wait_for_everyone()
        self.lengths = self.cache.lengths if cfg.group_by_length else None

        params = model.trainable_parameters()
        groups = [{"params": params["autoencoder"], "lr": opt.learning_rate, "name": "autoencoder"}]
        if params["language_model"]:
            groups.append(
                {
                    "params": params["language_model"],
                    "lr": opt.learning_rate * cfg.decoder_lr_scale,
                    "name": "language_model",
                }
            )
        self.optimizer = make_optimizer(groups, opt)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, opt)
        # The lr scheduler is not prepared: batch_size is the global batch, so it steps once per step.
        self.train_model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.modules = {"autoencoder": model.autoencoder, "language_model": model.language_model}

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        cfg, accelerator = self.cfg, self.accelerator
        indices = self.batch_indices(step, len(self.cache), self.lengths)
        hidden, mask, ids = self.cache.batch(indices, accelerator.device)
        labels = self.model.make_labels(ids, mask)
        with accelerator.autocast(), attention_kernel(accelerator.device):
            return self.train_model(
                hidden, mask, labels, reconstruction=step >= cfg.alignment_warmup_steps, generator=generator
            )

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every if self.val_texts else 0

    @property
    def evaluate_at_end(self) -> bool:
        return bool(self.val_texts)

    def evaluate(self, step: int, tracker: Tracker) -> dict[str, Any]:
        result = evaluate_reconstruction(
            self.model, self.val_texts, num_beams=self.cfg.eval_num_beams, num_examples=self.cfg.num_eval_examples
        )
        tracker.log_metrics({"eval/bleu": result["bleu"], "eval/exact_match": result["exact_match"]}, step)
        tracker.log_table(result["examples"], f"reconstructions/step_{step:08d}.json")
        logger.warning(
            "step %d: reconstruction BLEU %.2f, exact match %.3f", step, result["bleu"], result["exact_match"]
        )
        return {"bleu": result["bleu"], "exact_match": result["exact_match"]}

    def params(self) -> dict[str, Any]:
        return {
            "autoencoder.num_truncated_train_texts": self.num_truncated,
            "autoencoder.num_train_texts": len(self.train_texts),
        }

    def save(self, folder: Path) -> None:
        self.accelerator.unwrap_model(self.train_model).save_pretrained(folder)

    def summary(self) -> dict[str, Any]:
        return {
            "encoder_cache_s": round(self.cache_seconds, 1),
            "num_truncated_train_texts": self.num_truncated,
            "num_train_texts": len(self.train_texts),
        }


def train_autoencoder(
    config: RunConfig,
    resume: bool = False,
    tracker: Tracker | None = None,
    *,
    time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Train stage 1 as configured; returns ``<output_dir>/autoencoder`` (`TextAutoencoder.from_pretrained`).

    ``resume``, ``overwrite``, ``tracker`` and ``time_budget_s`` as in `latentlm.training.run_stage`.
    """
    return run_stage(
        AutoencoderStage(config), resume=resume, tracker=tracker, time_budget_s=time_budget_s, overwrite=overwrite
    )


def decoder_tuning_config(config: RunConfig, autoencoder_path: str | Path) -> AutoencoderTrainingConfig:
    """Stage 1's settings, continued from its trained folder ``autoencoder_path`` with the compression
    frozen, the noise and training loop of ``decoder_tuning:`` and no alignment warm-up."""
    tuning = config.decoder_tuning
    loop = {f.name: getattr(tuning, f.name) for f in dataclasses.fields(TrainingLoopConfig)}
    return dataclasses.replace(
        config.autoencoder,
        **loop,
        init_from=str(autoencoder_path),
        freeze_compression=True,
        latent_noise_std=tuning.latent_noise_std,
        alignment_warmup_steps=0,
        eval_every=tuning.eval_every,
    )


class DecoderTuningStage(AutoencoderStage):
    """Stage 1's decoder side trained on with the latents unchanged (`latentlm.config.DecoderTuningConfig`):
    on noisier latents between the stages, or, after stage 2 (``latent_source: denoiser``), on what
    stage 2's denoiser makes of each training text's noised latents."""

    name = "decoder_tuning"
    final_dir, checkpoint_dir, history_file = DECODER_DIR, DECODER_CHECKPOINT_DIR, DECODER_HISTORY_FILE

    def __init__(self, config: RunConfig, autoencoder_path: str | Path, diffusion_path: str | Path | None = None):
        super().__init__(config, decoder_tuning_config(config, autoencoder_path))
        tuning = config.decoder_tuning
        if tuning.latent_source == "denoiser" and diffusion_path is None:
            raise ValueError(
                "decoder_tuning.latent_source is 'denoiser', which tunes the decoder on stage 2's denoiser: pass "
                "diffusion_path (the <output_dir>/diffusion folder of a trained stage 2)."
            )
        self.diffusion_path = Path(diffusion_path) if tuning.latent_source == "denoiser" else None

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.denoiser = None
        if self.diffusion_path is None:
            return
        from diffusers import DDPMScheduler

        from latentlm.diffusion import LatentDenoiser
        from latentlm.train_diffusion import _load_training_data, resolve_class_labels

        self.denoiser = LatentDenoiser.from_pretrained(self.diffusion_path / "denoiser").eval().requires_grad_(False)
        self.denoiser.to(accelerator.device)
        self.noise_scheduler = DDPMScheduler.from_pretrained(self.diffusion_path / "scheduler")
        self.class_labels = None
        if self.denoiser.config.num_classes and self.config.data.label_column:
            _, raw_labels, _ = _load_training_data(self.config)
            labels, _ = resolve_class_labels(raw_labels, self.denoiser.config.class_names)
            self.class_labels = torch.tensor(labels)

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        if self.denoiser is None:
            return super().training_step(step, generator)
        from latentlm.diffusion import denoised_latents

        accelerator, model = self.accelerator, self.model
        indices = self.batch_indices(step, len(self.cache), self.lengths)
        hidden, mask, ids = self.cache.batch(indices, accelerator.device)
        labels = model.make_labels(ids, mask)
        classes = None if self.class_labels is None else self.class_labels[indices].to(accelerator.device)
        with accelerator.autocast(), attention_kernel(accelerator.device):
            with torch.no_grad():
                latents = model.autoencoder.compress(hidden, mask)
                latents = denoised_latents(
                    self.denoiser,
                    self.noise_scheduler,
                    latents,
                    tuple(self.config.decoder_tuning.denoiser_noise_levels),
                    class_labels=classes,
                    generator=generator,
                )
            return self.train_model(hidden, mask, labels, generator=generator, latents=latents)


def tune_decoder(
    config: RunConfig,
    autoencoder_path: str | Path,
    diffusion_path: str | Path | None = None,
    resume: bool = False,
    tracker: Tracker | None = None,
    *,
    time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Tune the decoder of the trained autoencoder ``autoencoder_path`` as ``config.decoder_tuning``
    says (``latent_source: denoiser`` reads stage 2's ``diffusion_path``); returns
    ``<output_dir>/decoder``, a `TextAutoencoder` folder with the same latents.

    ``resume``, ``overwrite``, ``tracker`` and ``time_budget_s`` as in `latentlm.training.run_stage`.
    """
    return run_stage(
        DecoderTuningStage(config, autoencoder_path, diffusion_path),
        resume=resume,
        tracker=tracker,
        time_budget_s=time_budget_s,
        overwrite=overwrite,
    )
