"""Stage 1 training: learn the latent autoencoder.

`train_autoencoder(config)` loads the data, caches the frozen encoder's states once, and trains in
the shared loop (`latentlm.training.loop.run_stage`): reconstruction BLEU / exact match every
``eval_every`` steps, atomic checkpoints, MLflow; the result is a `TextAutoencoder` folder,
``<output_dir>/autoencoder``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from latentlm.autoencoder.adapters import set_dropout
from latentlm.autoencoder.model_settings import settings_mismatch
from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from latentlm.autoencoder.text_codec import source_length_limit
from latentlm.config import AutoencoderTrainingConfig, RunConfig
from latentlm.data.loading import load_texts
from latentlm.evaluation.reconstruction import evaluate_reconstruction
from latentlm.mlflow.tracking import Tracker
from latentlm.training.encoder_cache import ENCODER_CACHE_DIR, build_encoder_cache
from latentlm.training.loop import TrainingStage, run_stage
from latentlm.training.optimization import make_lr_scheduler, make_optimizer
from latentlm.training.precision import attention_kernel

logger = logging.getLogger(__name__)

__all__ = ["train_autoencoder", "AutoencoderStage", "load_initial_autoencoder"]

FINAL_DIR = "autoencoder"
CHECKPOINT_DIR = "autoencoder_training"
HISTORY_FILE = "autoencoder_history.json"


def load_initial_autoencoder(cfg: AutoencoderTrainingConfig) -> TextAutoencoder:
    """The model stage 1 starts from: a new one built from ``cfg.model``, or the trained folder
    ``cfg.init_from`` (checked against ``cfg.model``, trainable, with the config's training settings),
    its compression network frozen when ``cfg.freeze_compression``."""
    training = dict(
        latent_noise_std=cfg.latent_noise_std, alignment_weight=cfg.alignment_weight, kl_weight=cfg.kl_weight
    )
    if not cfg.init_from:
        return TextAutoencoder.from_config(asdict(cfg.model), **training)
    # kl_weight is set after the check: a folder without a variational posterior is named there, not refused here
    model = TextAutoencoder.from_pretrained(cfg.init_from, trainable=True, **dict(training, kl_weight=0.0))
    differ = settings_mismatch(asdict(cfg.model), model)
    if differ:
        raise ValueError(
            f"autoencoder.init_from={cfg.init_from!r} was built with "
            + ", ".join(f"{key}={built!r}" for key, (_, built) in differ.items())
            + ", but the config asks for "
            + ", ".join(f"{key}={asked!r}" for key, (asked, _) in differ.items())
            + ". A trained autoencoder keeps its architecture: set these autoencoder.model values to the "
            "folder's (or leave init_from unset to build a new autoencoder)."
        )
    model.kl_weight = cfg.kl_weight
    if cfg.model.plm_dropout is not None:
        set_dropout(model.language_model, cfg.model.plm_dropout)
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
        self.val_contexts = None  # what a decoder that reads a context reads before each validation text
        if opt.batch_size > len(self.train_texts) and is_main:
            logger.warning(
                "batch_size %d exceeds the %d training texts; batches repeat texts.",
                opt.batch_size,
                len(self.train_texts),
            )

        self.model = model = load_initial_autoencoder(cfg)
        model.to(accelerator.device)
        limit = source_length_limit(model.tokenizer, model.language_model)
        if limit is not None and cfg.model.max_length > limit:
            raise ValueError(
                f"autoencoder.model.max_length={cfg.model.max_length} exceeds the {limit} positions the backbone "
                f"{cfg.model.backbone!r} reads; set max_length to at most {limit}."
            )
        lengths = [len(ids) for ids in model.token_ids(self.train_texts, truncation=False)]
        self.num_truncated = sum(n > model.max_length for n in lengths)
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        share = self.num_truncated / len(self.train_texts)
        if share > cfg.max_truncated_fraction:
            raise ValueError(
                f"{self.num_truncated} of {len(self.train_texts)} training texts ({100 * share:.1f}%) do not fit in "
                f"the latents' max_length={model.max_length} tokens (the longest, {lengths[longest]} tokens: "
                f"{self.train_texts[longest][:80]!r}), more than autoencoder.max_truncated_fraction="
                f"{cfg.max_truncated_fraction} allows to be cut. Raise autoencoder.model.max_length (and "
                "num_latents x tokens_per_query with it), split or shorten the texts, or allow the cut with a "
                "higher max_truncated_fraction."
            )
        if is_main and self.num_truncated:
            logger.warning(
                "%d of %d training texts (%.1f%%) are longer than max_length=%d tokens and are truncated "
                "(the longest, %d tokens: %r).",
                self.num_truncated,
                len(self.train_texts),
                100 * self.num_truncated / len(self.train_texts),
                model.max_length,
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
                hidden,
                mask,
                labels,
                reconstruction=step >= cfg.alignment_warmup_steps,
                generator=generator,
                alignment=cfg.alignment_steps is None or step < cfg.alignment_steps,
            )

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every if self.val_texts else 0

    @property
    def evaluate_at_end(self) -> bool:
        return bool(self.val_texts)

    def evaluate(self, step: int, tracker: Tracker) -> dict[str, Any]:
        result = evaluate_reconstruction(
            self.model,
            self.val_texts,
            context_texts=self.val_contexts,
            num_beams=self.cfg.eval_num_beams,
            num_examples=self.cfg.num_eval_examples,
        )
        scores = {key: result[key] for key in ("bleu", "exact_match", "posterior_std") if key in result}
        tracker.log_metrics({f"eval/{key}": value for key, value in scores.items()}, step)
        tracker.log_table(result["examples"], f"reconstructions/step_{step:08d}.json")
        logger.warning(
            "step %d: reconstruction BLEU %.2f, exact match %.3f%s",
            step,
            result["bleu"],
            result["exact_match"],
            f", posterior std {scores['posterior_std']:.3f}" if "posterior_std" in scores else "",
        )
        return scores

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

    ``resume``, ``overwrite``, ``tracker`` and ``time_budget_s`` as in `latentlm.training.loop.run_stage`.
    """
    return run_stage(
        AutoencoderStage(config), resume=resume, tracker=tracker, time_budget_s=time_budget_s, overwrite=overwrite
    )
