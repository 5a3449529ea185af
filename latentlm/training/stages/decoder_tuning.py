"""Decoder tuning: stage 1's decoder side trained on with its latents unchanged (`DecoderTuningConfig`).

Between the stages it reads noisier latents; after stage 2 (``latent_source: denoiser``) it reads
what stage 2's denoiser makes of each training text's noised latents, so that the decoder learns to
write real text from the denoiser's own kind of error; with ``read_context`` it also reads each
example's source text (a segment's context) before the latents. The result is
``<output_dir>/decoder``, a `TextAutoencoder` folder with the same latents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from latentlm.config import AutoencoderTrainingConfig, RunConfig, TrainingLoopConfig
from latentlm.mlflow.tracking import Tracker
from latentlm.training.latent_context import DenoiserContext
from latentlm.training.loop import run_stage
from latentlm.training.precision import attention_kernel, resolve_mixed_precision
from latentlm.training.stages.autoencoder import AutoencoderStage

__all__ = ["tune_decoder", "DecoderTuningStage", "decoder_tuning_config"]

DECODER_DIR = "decoder"
DECODER_CHECKPOINT_DIR = "decoder_training"
DECODER_HISTORY_FILE = "decoder_history.json"


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
        # the compression is frozen, so a variational posterior's KL is a constant: left out
        kl_weight=0.0,
        alignment_warmup_steps=0,
        # a stage 1 whose alignment ended leaves it out of the tuning too
        alignment_steps=None if config.autoencoder.alignment_steps is None else 0,
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
        if tuning.read_context and config.data.source_column is None:
            raise ValueError(
                "decoder_tuning.read_context has the decoder read each example's source text, but the data has "
                "none: set data.source_column, or data.segments: true with data.segment_context: text."
            )
        self.diffusion_path = Path(diffusion_path) if tuning.latent_source == "denoiser" else None
        self.autoencoder_path = Path(autoencoder_path)

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.denoiser = None
        if self.diffusion_path is None:
            return
        from diffusers import DDPMScheduler

        from latentlm.data.labels import load_training_examples, resolve_class_labels
        from latentlm.data.loading import load_text_dataset
        from latentlm.diffusion import LatentDenoiser

        self.denoiser = LatentDenoiser.from_pretrained(self.diffusion_path / "denoiser").eval().requires_grad_(False)
        self.denoiser.to(accelerator.device)
        self.noise_scheduler = DDPMScheduler.from_pretrained(self.diffusion_path / "scheduler")
        texts, raw_labels, sources = load_training_examples(self.config.data)
        self.context_texts = sources if self.config.decoder_tuning.read_context else None
        if self.context_texts is not None:
            self.check_contexts(self.context_texts)
            if self.val_texts:  # evaluated as the pipeline decodes: reading each text's context
                data = self.config.data
                validation = load_text_dataset(data, data.validation_split, data.max_eval_samples)
                self.val_contexts = list(validation[data.source_column])
                self.check_contexts(self.val_contexts)
        labels = self.class_labels = None
        if self.denoiser.config.num_classes and self.config.data.label_column:
            labels, _ = resolve_class_labels(raw_labels, self.denoiser.config.class_names)
            self.class_labels = torch.tensor(labels)
        self.context = None
        if self.denoiser.config.get("cross_attention_dim") is not None:
            self.context = self.stage2_context(texts, labels, sources, accelerator)

    def check_contexts(self, contexts: list[str]) -> None:
        """The decoder reads ``contexts`` from now on (saved in the autoencoder's config, so the pipeline
        gives it its call's): each must leave the LM room for the latents' prompt and the text."""
        from latentlm.autoencoder.causal_decoding import soft_prompt_length
        from latentlm.autoencoder.text_codec import source_length_limit, tokenize_contexts

        model = self.model
        model.enable_context_reading()
        positions = source_length_limit(model.tokenizer, model.language_model)
        if positions is not None:
            room = positions - soft_prompt_length(model.tokenizer, model.autoencoder) - model.max_length - 1
            tokenize_contexts(model.tokenizer, contexts, limit=room)

    def stage2_context(self, texts, labels, sources, accelerator) -> DenoiserContext:
        """Stage 2's latent cache of the training texts (found again by its key: the same autoencoder,
        data and precision) and what each example read there as its context, so that a text-to-text or
        segment denoiser predicts the latents in their context, as when it samples."""
        from latentlm.autoencoder.text_autoencoder import TextAutoencoder
        from latentlm.training.encoder_cache import ENCODER_CACHE_DIR
        from latentlm.training.latent_cache import build_latent_cache
        from latentlm.training.stages.diffusion import CACHE_DIR

        cache = build_latent_cache(
            TextAutoencoder.from_pretrained(self.autoencoder_path).to(accelerator.device),
            texts,
            self.autoencoder_path / CACHE_DIR,
            labels=labels,
            class_names=self.denoiser.config.class_names,
            show_progress=accelerator.is_main_process,
            sources=sources,
            mixed_precision=resolve_mixed_precision(self.config.diffusion.mixed_precision, accelerator.device),
            encoder_cache_dir=Path(self.config.output_dir) / ENCODER_CACHE_DIR,
        )
        return DenoiserContext(cache, self.config.data)

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        if self.denoiser is None:
            return super().training_step(step, generator)
        from latentlm.autoencoder.text_codec import tokenize_contexts
        from latentlm.diffusion import denoised_latents

        accelerator, model = self.accelerator, self.model
        indices = self.batch_indices(step, len(self.cache), self.lengths)
        hidden, mask, ids = self.cache.batch(indices, accelerator.device)
        labels = model.make_labels(ids, mask)
        classes = None if self.class_labels is None else self.class_labels[indices].to(accelerator.device)
        context, context_mask = self.context.batch(indices, accelerator.device) if self.context else (None, None)
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
                    encoder_hidden_states=context,
                    encoder_attention_mask=context_mask,
                )
            read = None
            if self.context_texts is not None:
                read = tokenize_contexts(model.tokenizer, [self.context_texts[i] for i in indices], accelerator.device)
            return self.train_model(hidden, mask, labels, generator=generator, latents=latents, context=read)


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

    ``resume``, ``overwrite``, ``tracker`` and ``time_budget_s`` as in `latentlm.training.loop.run_stage`.
    """
    return run_stage(
        DecoderTuningStage(config, autoencoder_path, diffusion_path),
        resume=resume,
        tracker=tracker,
        time_budget_s=time_budget_s,
        overwrite=overwrite,
    )
