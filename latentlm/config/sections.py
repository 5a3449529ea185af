"""The sections of a run config, one dataclass each; each checks its own values (`validate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentlm.config.autoencoder_model import AutoencoderModelConfig
from latentlm.config.checks import one_of

#: ``optimizer.lr_schedule`` values -> transformers scheduler names (`latentlm.training.optimization`)
LR_SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
    "warmup_stable_decay": "warmup_stable_decay",
}
# accelerate's names, and "auto": bf16 where the hardware computes it natively, else fp32 (fp16 on an
# older GPU); see `latentlm.training.precision.resolve_mixed_precision`
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
#: what the decoder tuning feeds the decoder (`DecoderTuningConfig.latent_source`)
DECODER_LATENT_SOURCES = ("noise", "denoiser")


@dataclass
class DataConfig:
    """Where the texts come from: a hub dataset name, or a local jsonl/json/csv/txt/parquet file or folder."""

    path: str = ""
    text_column: str = "text"
    label_column: str | None = None
    # text-to-text: the column of the source texts the model generates from (None = no source)
    source_column: str | None = None
    # text-to-text: the column of the target texts; another name for text_column, which it sets
    target_column: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    max_train_samples: int | None = None
    max_eval_samples: int = 256
    # long texts: every text is a document whose sentences become (context, segment) examples, the
    # segment in text_column and its context (the text around it, with a gap marker) in the source
    # column "context" (`latentlm.data.segments`); the model then writes stories segment by segment
    segments: bool = False
    # how the denoiser reads a segment's context: "text" (the context text's encoder states, through the
    # text-to-text cross-attention) or "latents" (the latents of the other segments, with their place)
    segment_context: str = "text"

    def __post_init__(self):
        one_of("data.segment_context", self.segment_context, ("text", "latents"))
        if self.segment_context == "latents" and not self.segments:
            raise ValueError(
                "data.segment_context=latents is how segments read their context: set data.segments: true."
            )
        if self.segments:
            if self.source_column not in (None, "context"):
                raise ValueError(
                    f"data.segments makes the source column 'context' (each segment's context), but data.source_column "
                    f"is {self.source_column!r}: leave it unset."
                )
            # with latent contexts no text is a source: the stage reads the other segments' latents
            self.source_column = "context" if self.segment_context == "text" else None
        if self.target_column is not None:
            if self.text_column not in ("text", self.target_column):
                raise ValueError(
                    f"data.target_column={self.target_column!r} and data.text_column={self.text_column!r} name "
                    "the same thing (the texts to generate); set only one of them."
                )
            self.text_column = self.target_column
        if self.source_column is not None and self.source_column == self.text_column:
            raise ValueError(f"data.source_column and the target column are both {self.source_column!r}.")


@dataclass
class OptimizerConfig:
    """AdamW with warmup then decay; LD4LG values are the defaults of each stage."""

    learning_rate: float = 1e-4
    batch_size: int = 256
    max_steps: int = 50_000
    warmup_steps: int = 1_000
    lr_schedule: str = "linear"  # linear | cosine | constant | warmup_stable_decay
    decay_steps: int = 0  # warmup_stable_decay: the last steps, over which the rate falls linearly to zero
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999

    def validate(self, where: str) -> None:
        one_of(f"{where}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for key in ("learning_rate", "batch_size", "max_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{where}.{key} must be positive, got {getattr(self, key)!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.lr_schedule == "warmup_stable_decay" and not 0 < self.decay_steps <= self.max_steps - self.warmup_steps:
            raise ValueError(
                f"{where}.decay_steps is {self.decay_steps}, but lr_schedule 'warmup_stable_decay' needs "
                f"0 < decay_steps <= max_steps - warmup_steps ({self.max_steps - self.warmup_steps}): set the "
                "number of final steps over which the learning rate decays to zero."
            )
        if self.max_grad_norm < 0:
            raise ValueError(f"{where}.max_grad_norm must be >= 0 (0: no gradient clipping), got {self.max_grad_norm}.")


@dataclass
class TrainingLoopConfig:
    """What every training stage shares (`latentlm.training.loop.run_stage`): the optimizer, the cadence of
    logging and checkpoints, mixed precision, the seed and an optional time budget."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    save_every: int = 1_000
    log_every: int = 10
    keep_last_checkpoints: int = 2
    mixed_precision: str = "no"
    seed: int = 0
    # stop after this many minutes of training steps, before max_steps if need be (None = no limit);
    # a `--time-budget` on the command line replaces it
    time_budget_minutes: float | None = None

    def validate(self, where: str) -> None:
        one_of(f"{where}.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        self.optimizer.validate(f"{where}.optimizer")
        for key, what in (
            ("log_every", "steps between logged losses"),
            ("save_every", "steps between checkpoints; without checkpoints a stopped run cannot resume"),
            ("keep_last_checkpoints", "checkpoints kept"),
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key} must be >= 1 ({what}), got {getattr(self, key)!r}.")
        if getattr(self, "eval_every", 0) < 0:
            raise ValueError(
                f"{where}.eval_every must be >= 0 (0: no evaluation during training), got {self.eval_every}."
            )
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(
                f"{where}.time_budget_minutes must be positive (or null for no limit), got {self.time_budget_minutes}."
            )


@dataclass
class AutoencoderTrainingConfig(TrainingLoopConfig):
    """Stage 1: frozen PLM encoder + learned compression/reconstruction (+ optional LoRA decoder).

    ``model`` is the autoencoder (passed whole to `TextAutoencoder.from_config`); the other keys say
    how it trains.
    """

    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    # decoder-only backbones: weight of the loss pulling soft prompt slot j to the embedding of token j
    alignment_weight: float = 0.0
    # decoder-only backbones: the first steps train the alignment loss alone (no LM forward: much cheaper)
    alignment_warmup_steps: int = 0
    # decoder-only backbones: the alignment loss stops after this many steps (None: never), freeing the code
    alignment_steps: int | None = None
    # the share of training texts that may be cut at model.max_length (with a warning); more is an error
    max_truncated_fraction: float = 0.01
    # std of the Gaussian noise added to the latents the decoder reads in training (0 = none)
    latent_noise_std: float = 0.0
    # model.variational: weight of the KL penalty that keeps the posterior's spread up (Optimus, PLANNER)
    kl_weight: float = 0.0
    # start from this trained TextAutoencoder folder instead of a new one over `model.backbone` (`model` describes it)
    init_from: str | None = None
    # keep the compression network (and so every text's latents) as it is: only the reconstruction
    # side trains, and denoisers trained on the latents of `init_from` stay valid (needs init_from)
    freeze_compression: bool = False
    # learning rate of the language model's trainable weights = learning_rate * decoder_lr_scale
    decoder_lr_scale: float = 1.0
    eval_num_beams: int = 4  # reconstruction BLEU decoding (LD4LG: 4 beams; 1 = greedy)
    num_eval_examples: int = 16  # reconstruction examples logged as an MLflow table
    # Decoding defaults saved with the pipeline, over text_codec.DEFAULT_GENERATE_KWARGS (LD4LG's beam search,
    # no_repeat_ngram_size=3, repetition_penalty=1.2), e.g. {no_repeat_ngram_size: 0, repetition_penalty: 1.0}
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    # The pipeline's decoding of gap fillings (pipe(infill=...), data.segments), over the decoding above
    # (and decoder_tuning.generate_kwargs), e.g. {do_sample: false, num_beams: 4}
    infill_generate_kwargs: dict[str, Any] = field(default_factory=dict)
    # Batches of texts of similar length (transformers' group_by_length): less padding, faster steps.
    group_by_length: bool = False
    eval_every: int = 1_000

    def validate(self, where: str = "autoencoder") -> None:
        super().validate(where)
        self.model.validate(f"{where}.model")
        if self.alignment_warmup_steps and not self.alignment_weight:
            raise ValueError(
                f"{where}.alignment_warmup_steps={self.alignment_warmup_steps} trains only the alignment "
                f"loss, but {where}.alignment_weight is 0: set a weight or alignment_warmup_steps: 0."
            )
        if not 0 <= self.max_truncated_fraction <= 1:
            raise ValueError(
                f"{where}.max_truncated_fraction must be a share in [0, 1], got {self.max_truncated_fraction}."
            )
        if self.alignment_steps is not None and self.alignment_steps < self.alignment_warmup_steps:
            raise ValueError(
                f"{where}.alignment_steps={self.alignment_steps} ends the alignment loss before its warm-up "
                f"({where}.alignment_warmup_steps={self.alignment_warmup_steps}), leaving steps with no loss: "
                "set alignment_steps >= alignment_warmup_steps, or null to align throughout."
            )
        if self.freeze_compression and not self.init_from:
            raise ValueError(
                f"{where}.freeze_compression keeps the latents of a trained autoencoder, but {where}.init_from "
                "is not set: set it to that autoencoder's folder (e.g. <output_dir>/autoencoder of its run)."
            )
        if self.latent_noise_std < 0:
            raise ValueError(f"{where}.latent_noise_std must be >= 0 (0: no noise), got {self.latent_noise_std}.")
        if self.kl_weight < 0:
            raise ValueError(f"{where}.kl_weight must be >= 0 (0: no KL penalty), got {self.kl_weight}.")
        if self.model.variational and self.latent_noise_std:
            raise ValueError(
                f"{where}.latent_noise_std={self.latent_noise_std} would add fixed noise to the samples of the "
                f"variational posterior ({where}.model.variational), whose spread is learned: set latent_noise_std to 0."
            )
        if self.generate_kwargs.get("encoder_no_repeat_ngram_size"):
            raise ValueError(
                f"{where}.generate_kwargs: encoder_no_repeat_ngram_size bans the n-grams of the context a decoder "
                "reads, and stage 1's decoder reads none: set it in decoder_tuning.generate_kwargs (with "
                "decoder_tuning.read_context), or use no_repeat_ngram_size."
            )
        if self.kl_weight and not self.model.variational:
            raise ValueError(
                f"{where}.kl_weight={self.kl_weight} penalises a variational posterior, but "
                f"{where}.model.variational is false: set it to true, or kl_weight to 0."
            )


@dataclass
class DecoderTuningConfig(TrainingLoopConfig):
    """Between the stages of `latentlm train`, when ``enabled``: stage 1's autoencoder trains on for a
    while with its compression network frozen and noisier latents, so that its decoder writes well
    from a denoiser's samples (as Stable Diffusion's VAE decoder was fine-tuned). Every text keeps
    its latents, so stage 2 is unchanged; the pipeline gets the tuned decoder. The model keys and
    the other training keys are stage 1's (``autoencoder:``); the result is ``<output_dir>/decoder``."""

    enabled: bool = False
    latent_noise_std: float = 1.0
    # what the decoder reads: "noise" (the latents + latent_noise_std x Gaussian noise; runs before
    # stage 2) or "denoiser" (stage 2's denoiser's ẑ0 from the latents noised to a level t/T drawn
    # from denoiser_noise_levels, plus latent_noise_std noise if set; runs after stage 2), so that
    # the decoder learns to write real text from the denoiser's own kind of error, as cascaded
    # diffusion stages train on the outputs of the stage before
    latent_source: str = "noise"
    denoiser_noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.5])
    # the decoder also reads each example's source text (with data.segments, the segment's context: the
    # story so far) before the latents' prompt, and the pipeline gives it the same when it samples
    # (PLANNER's decoder reads the text so far); needs latent_source: denoiser and a decoder-only LM
    read_context: bool = False
    # Decoding defaults the pipeline saves for the tuned decoder, over autoencoder.generate_kwargs; e.g.
    # {encoder_no_repeat_ngram_size: 4}: a decoder that reads the story so far repeats none of its 4-grams
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1_000
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            learning_rate=5e-4, batch_size=64, max_steps=1_000, warmup_steps=20, lr_schedule="cosine"
        )
    )

    def validate(self, where: str = "decoder_tuning") -> None:
        super().validate(where)
        if self.latent_noise_std < 0:
            raise ValueError(f"{where}.latent_noise_std must be >= 0 (0: no noise), got {self.latent_noise_std}.")
        one_of(f"{where}.latent_source", self.latent_source, DECODER_LATENT_SOURCES)
        if self.read_context and self.latent_source != "denoiser":
            raise ValueError(
                f"{where}.read_context tunes the decoder on stage 2's samples in their context: set "
                f"{where}.latent_source: denoiser."
            )
        if self.generate_kwargs.get("encoder_no_repeat_ngram_size") and not self.read_context:
            raise ValueError(
                f"{where}.generate_kwargs bans the n-grams of the context the decoder reads "
                f"(encoder_no_repeat_ngram_size), but it reads none: set {where}.read_context: true, or "
                f"{where}.generate_kwargs to {{}} (--set '{where}.generate_kwargs={{}}')."
            )
        levels = list(self.denoiser_noise_levels)
        if len(levels) != 2 or not 0.0 <= levels[0] <= levels[1] <= 1.0:
            raise ValueError(
                f"{where}.denoiser_noise_levels={levels}: give [low, high] with 0 <= low <= high <= 1 "
                "(noise levels t / num_train_timesteps)."
            )


@dataclass
class DiffusionTrainingConfig(TrainingLoopConfig):
    """Stage 2: the latent denoiser (LD4LG recipe: v-prediction, cosine, self-conditioning, CFG dropout)."""

    denoiser_size: str = "base"  # tiny | small | base
    denoiser: dict[str, Any] = field(default_factory=dict)  # overrides of LatentDenoiser arguments
    schedule: str = "cosine"  # cosine | linear | sqrt | shifted_cosine | adaptive
    # adaptive (SeqDiffuSeq): start as cosine, re-fit the schedule to the loss every this many steps
    adaptive_schedule_every: int = 1_000
    noise_floor: float = 0.0  # the least noise std of every step (DINOISER); 0 = none
    prediction_type: str = "v_prediction"  # v_prediction | epsilon | sample
    num_train_timesteps: int = 1_000
    self_conditioning_prob: float = 0.5
    label_dropout_prob: float = 0.1
    # text-to-text: probability that a source is replaced by the null context (CFG on the source)
    source_dropout_prob: float = 0.1
    loss_type: str = "l2"  # l2 | l1
    timestep_sampling: str = "uniform"  # uniform | importance
    # draw every class equally often (smaller classes repeat within an epoch): for corpora whose
    # classes are uneven when the samples of each class should be equally good
    balance_classes: bool = False
    ema_decay: float = 0.9999
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            learning_rate=2e-4, batch_size=128, max_steps=250_000, warmup_steps=1_000, lr_schedule="cosine"
        )
    )
    sample_every: int = 5_000
    num_samples_per_class: int = 4
    sample_inference_steps: int = 50
    save_every: int = 5_000

    def validate(self, where: str = "diffusion") -> None:
        from latentlm.diffusion import LOSS_TYPES, PREDICTION_TYPES, SCHEDULES, TIMESTEP_SAMPLING

        super().validate(where)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{where}.ema_decay must lie in [0, 1) (e.g. 0.9999), got {self.ema_decay}.")
        one_of(f"{where}.schedule", self.schedule, SCHEDULES)
        one_of(f"{where}.prediction_type", self.prediction_type, PREDICTION_TYPES)
        one_of(f"{where}.loss_type", self.loss_type, LOSS_TYPES)
        one_of(f"{where}.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        for key in ("self_conditioning_prob", "label_dropout_prob", "source_dropout_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}.{key} must lie in [0, 1], got {value}.")
        if not 0.0 <= self.noise_floor < 1.0:
            raise ValueError(f"{where}.noise_floor must lie in [0, 1) (a noise std; 0 = none), got {self.noise_floor}.")
        if self.adaptive_schedule_every < 1:
            raise ValueError(
                f"{where}.adaptive_schedule_every must be >= 1 (steps between re-fits of the adaptive schedule), "
                f"got {self.adaptive_schedule_every}."
            )
        if self.schedule == "adaptive" and self.timestep_sampling == "importance":
            raise ValueError(
                f"{where}.schedule=adaptive re-spaces the timesteps by their loss and timestep_sampling=importance "
                "re-weights them by it: use one of the two."
            )


@dataclass
class ClassifierTrainingConfig(TrainingLoopConfig):
    """A latent classifier for classifier guidance (`latentlm train-classifier`), trained on the latents
    of stage 1 at noise levels drawn as in stage 2."""

    label_column: str | None = None  # classify this data column ...
    target: str | None = None  # ... or regress a derived target: "length" (tokens of the text)
    name: str | None = None  # the control's name (default: the label column or the target)
    classifier: dict[str, Any] = field(default_factory=dict)  # overrides of LatentClassifier arguments
    eval_every: int = 500
    num_noise_levels: int = 10  # accuracy (or MAE) is reported at this many evenly spaced timesteps
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            learning_rate=1e-3, batch_size=128, max_steps=2_000, warmup_steps=100, lr_schedule="cosine"
        )
    )


@dataclass
class TrackingConfig:
    """MLflow. ``tracking_uri=None`` uses ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local store
    (``sqlite:///mlflow.db`` in the working directory)."""

    enabled: bool = True
    experiment_name: str = "latentlm"
    tracking_uri: str | None = None
    run_name: str | None = None
