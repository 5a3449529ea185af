"""End to end: `train(config)` runs both stages and writes a `LatentTextDiffusionPipeline` folder.

Steps (each one skipped on ``resume=True`` when its result is already complete):

0. data: ``data.path: builtin:restaurants`` writes the self-generated quickstart corpus
   (`latentlm.corpus`) to ``<output_dir>/corpus``; any other path is used as it is.
   backbone: ``autoencoder.backbone: scratch:<preset>`` builds a small BART with a word-level
   tokenizer trained on the corpus and pre-trains it fully as a denoising seq2seq model (its own
   short stage) into ``<output_dir>/backbone``; a named backbone, folder or hub id is used as it is.
1. stage 1: `latentlm.train_autoencoder.train_autoencoder` -> ``<output_dir>/autoencoder``.
2. stage 2: `latentlm.train_diffusion.train_diffusion` (latent cache + denoiser) -> ``<output_dir>/diffusion``.
3. the pipeline (PEFT adapters merged) -> ``<output_dir>/pipeline``; a few samples per class ->
   ``<output_dir>/samples.jsonl`` (and printed).

MLflow: one parent run with a nested run per stage; the pipeline folder is logged as an artifact
and as an MLflow pyfunc model (`latentlm.mlflow_model`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentlm.config import OptimizerConfig, RunConfig
from latentlm.tracking import Tracker
from latentlm.training import (
    atomic_directory,
    batch_indices,
    check_finite,
    make_lr_scheduler,
    make_optimizer,
    seed_step,
)

logger = logging.getLogger(__name__)

__all__ = ["train", "prepare_data", "prepare_backbone", "build_pipeline", "SCRATCH_BACKBONES", "BUILTIN_CORPORA"]

PIPELINE_DIR = "pipeline"
SAMPLES_FILE = "samples.jsonl"
BACKBONE_DIR = "backbone"
CORPUS_DIR = "corpus"

#: ``data.path`` values that name a corpus the project generates itself.
BUILTIN_CORPORA = {"builtin:restaurants": dict(num_train=20000, num_validation=1000)}

#: ``autoencoder.backbone: scratch:<name>``: a BART built from this config (vocabulary from the
#: training texts), pre-trained as a denoising seq2seq model for ``pretrain`` steps.
SCRATCH_BACKBONES: dict[str, dict[str, Any]] = {
    "bart-tiny": dict(
        model=dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512),
        pretrain=OptimizerConfig(learning_rate=1e-3, batch_size=64, max_steps=300, warmup_steps=30,
                                 lr_schedule="linear", weight_decay=0.01),
        mask_prob=0.2, vocab_size=8000,
    ),
    "bart-small": dict(
        model=dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
        pretrain=OptimizerConfig(learning_rate=5e-4, batch_size=64, max_steps=1500, warmup_steps=100,
                                 lr_schedule="linear", weight_decay=0.01),
        mask_prob=0.2, vocab_size=16000,
    ),
}
SCRATCH_PREFIX = "scratch:"


# ------------------------------------------------------------------------------------------------
# Step 0: data and backbone
# ------------------------------------------------------------------------------------------------

def prepare_data(config: RunConfig) -> RunConfig:
    """Materialise a builtin corpus under ``<output_dir>/corpus``; returns the config pointing at it."""
    path = str(config.data.path)
    if not path.startswith("builtin:"):
        return config
    if path not in BUILTIN_CORPORA:
        raise ValueError(f"Unknown builtin corpus {path!r}; available: {sorted(BUILTIN_CORPORA)}.")
    from latentlm import corpus

    folder = Path(config.output_dir) / CORPUS_DIR
    sizes = BUILTIN_CORPORA[path]
    seed = config.autoencoder.seed
    stamp = folder / "corpus.json"
    expected = {"corpus": path, "seed": seed, **sizes}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == expected):
        corpus.write_corpus(folder, seed=seed, **sizes)
        stamp.write_text(json.dumps(expected))
    data = dataclasses.replace(config.data, path=str(folder), text_column="text",
                               label_column=config.data.label_column)
    return dataclasses.replace(config, data=data)


def build_word_tokenizer(texts: list[str], vocab_size: int = 8000, model_max_length: int = 512):
    """A word-level `PreTrainedTokenizerFast` for a small closed-vocabulary corpus.

    Words are split at whitespace, with ``.`` and ``,`` as their own tokens; decoding joins words
    with spaces and re-attaches punctuation, so corpus texts round-trip exactly. Special tokens:
    ``<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4`` (BART's layout).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(".", behavior="isolated"),
        pre_tokenizers.Split(",", behavior="isolated"),
    ])
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, bos_token="<s>",
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")


def build_scratch_bart(tokenizer, model_kwargs: dict[str, Any], max_length: int):
    """A randomly initialised `BartForConditionalGeneration` sized by ``model_kwargs``."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        # Room for generation beyond the training length (DEFAULT_GENERATE_KWARGS' max_length is 64):
        # a sample whose decoding runs on must stop at max_length, not index past the positions.
        vocab_size=len(tokenizer), max_position_embeddings=max(2 * max_length, 128),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **model_kwargs,
    )
    return BartForConditionalGeneration(config)


def pretrain_scratch_backbone(texts: list[str], out_dir: str | Path, preset: str = "bart-tiny", *,
                              max_length: int = 64, seed: int = 0, tracker: Tracker | None = None) -> Path:
    """Build and pre-train a small BART on ``texts`` (all weights, masked-token denoising) -> ``out_dir``.

    The input has ``mask_prob`` of its words replaced by ``<mask>``; the target is the clean text.
    The encoder thus learns states that carry every word, and the decoder learns the language.
    """
    if preset not in SCRATCH_BACKBONES:
        raise ValueError(f"Unknown scratch backbone {preset!r}; available: {sorted(SCRATCH_BACKBONES)}.")
    spec = SCRATCH_BACKBONES[preset]
    opt = spec["pretrain"]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(texts, vocab_size=spec["vocab_size"])
    model = build_scratch_bart(tokenizer, spec["model"], max_length)
    model.train()
    encodings = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    optimizer = make_optimizer(model.parameters(), opt)
    lr_scheduler = make_lr_scheduler(optimizer, opt)
    pad, mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
    special = torch.tensor(tokenizer.all_special_ids)
    running: list[float] = []
    progress = tqdm(range(opt.max_steps), desc=f"pretrain {preset}")
    for step in progress:
        indices = batch_indices(len(encodings), opt.batch_size, step, seed)
        length = max(len(encodings[i]) for i in indices)
        ids = torch.full((len(indices), length), pad, dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(encodings[i])] = torch.tensor(encodings[i])
        attention_mask = (ids != pad).long()
        generator = seed_step(seed, step)
        drop = (torch.rand(ids.shape, generator=generator) < spec["mask_prob"]) & ~torch.isin(ids, special)
        loss = model(input_ids=ids.masked_fill(drop, mask_id), attention_mask=attention_mask,
                     labels=ids.masked_fill(attention_mask == 0, -100)).loss
        check_finite(loss, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == opt.max_steps:
            mean = sum(running) / len(running)
            running = []
            progress.set_postfix(loss=f"{mean:.3f}")
            if tracker is not None:
                tracker.log_metrics({"backbone/loss": mean}, step + 1)
    model.eval()
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "scratch_backbone.json").write_text(json.dumps(
            {"preset": preset, "num_texts": len(texts), "max_length": max_length, "seed": seed}))
    return Path(out_dir)


def prepare_backbone(config: RunConfig, tracker: Tracker | None = None, resume: bool = False) -> RunConfig:
    """Build and pre-train a ``scratch:<preset>`` backbone; returns the config pointing at its folder."""
    backbone = str(config.autoencoder.backbone)
    if not backbone.startswith(SCRATCH_PREFIX):
        return config
    preset = backbone[len(SCRATCH_PREFIX):]
    if preset not in SCRATCH_BACKBONES:
        raise ValueError(f"Unknown scratch backbone {backbone!r}; available: "
                         f"{[SCRATCH_PREFIX + name for name in SCRATCH_BACKBONES]}.")
    folder = Path(config.output_dir) / BACKBONE_DIR
    if not (resume and (folder / "scratch_backbone.json").is_file()):
        from latentlm.data import load_texts

        texts = load_texts(config.data, config.data.train_split, config.data.max_train_samples)
        pretrain_scratch_backbone(texts, folder, preset, max_length=config.autoencoder.max_length,
                                  seed=config.autoencoder.seed, tracker=tracker)
    autoencoder = dataclasses.replace(config.autoencoder, backbone=str(folder))
    return dataclasses.replace(config, autoencoder=autoencoder)


# ------------------------------------------------------------------------------------------------
# Step 3: the pipeline
# ------------------------------------------------------------------------------------------------

def build_pipeline(autoencoder_path: str | Path, diffusion_path: str | Path,
                   decode_kwargs: dict[str, Any] | None = None):
    """A `LatentTextDiffusionPipeline` from stage 1's and stage 2's output folders.

    ``decode_kwargs`` become the pipeline's saved decoding defaults.
    """
    from diffusers import DDPMScheduler

    from latentlm.diffusion import LatentDenoiser
    from latentlm.pipelines import LatentTextDiffusionPipeline
    from latentlm.text_autoencoder import TextAutoencoder

    text_autoencoder = TextAutoencoder.from_pretrained(autoencoder_path)
    diffusion_path = Path(diffusion_path)
    denoiser = LatentDenoiser.from_pretrained(diffusion_path / "denoiser").eval()
    scheduler = DDPMScheduler.from_pretrained(diffusion_path / "scheduler")
    pipe = LatentTextDiffusionPipeline(
        tokenizer=text_autoencoder.tokenizer, language_model=text_autoencoder.merged_language_model().eval(),
        autoencoder=text_autoencoder.autoencoder.eval(), denoiser=denoiser, scheduler=scheduler,
        max_length=text_autoencoder.max_length, decode_kwargs=decode_kwargs,
    )
    return pipe


def sample_per_class(pipe, num_per_class: int = 4, num_inference_steps: int = 50, guidance_scale: float = 2.0,
                     seed: int = 0) -> list[dict[str, Any]]:
    """``num_per_class`` samples for every class (or unconditional ones) with DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler

    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="dpmsolver++")
    rows: list[dict[str, Any]] = []
    try:
        for name in pipe.class_names or [None]:
            out = pipe(num_samples=num_per_class, class_labels=name,
                       guidance_scale=guidance_scale if name is not None else 1.0,
                       num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed))
            rows.extend({"class": name, "text": text} for text in out.texts)
    finally:
        pipe.scheduler = original
    return rows


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

def _stage_done(history_file: Path, final_dir: Path, max_steps: int) -> bool:
    if not (history_file.is_file() and final_dir.is_dir()):
        return False
    return int(json.loads(history_file.read_text()).get("final_step", -1)) >= max_steps


def train(config: RunConfig, resume: bool = False, *, sample_guidance_scale: float = 2.0) -> Path:
    """Train stage 1 and stage 2 end to end; returns ``<output_dir>/pipeline``.

    Args:
        config: the run config (`latentlm.config.load_config`).
        resume: continue an interrupted run: finished steps are skipped, a stage in progress
            resumes from its last checkpoint.
        sample_guidance_scale: guidance of the samples written to ``samples.jsonl``
            (``diffusion.num_samples_per_class`` per class, ``diffusion.sample_inference_steps`` steps).
    """
    from latentlm.mlflow_model import log_pipeline_model
    from latentlm.train_autoencoder import FINAL_DIR as AE_DIR
    from latentlm.train_autoencoder import HISTORY_FILE as AE_HISTORY
    from latentlm.train_autoencoder import train_autoencoder
    from latentlm.train_diffusion import FINAL_DIR as DIFFUSION_DIR
    from latentlm.train_diffusion import HISTORY_FILE as DIFFUSION_HISTORY
    from latentlm.train_diffusion import train_diffusion

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    config = prepare_data(config)
    tracking = config.tracking
    with Tracker(tracking, run_name=tracking.run_name or "train", fallback_dir=output_dir) as parent:
        parent.log_params(config.to_dict())

        tick = time.perf_counter()
        if str(config.autoencoder.backbone).startswith(SCRATCH_PREFIX):
            with Tracker(tracking, run_name="backbone", parent=parent, fallback_dir=output_dir) as child:
                config = prepare_backbone(config, tracker=child, resume=resume)
        timings["backbone_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        autoencoder_path = output_dir / AE_DIR
        if resume and _stage_done(output_dir / AE_HISTORY, autoencoder_path, config.autoencoder.optimizer.max_steps):
            logger.warning("Stage 1 already finished in %s; skipping it.", autoencoder_path)
        else:
            with Tracker(tracking, run_name="autoencoder", parent=parent, fallback_dir=output_dir) as child:
                autoencoder_path = train_autoencoder(config, resume=resume, tracker=child)
        timings["autoencoder_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        diffusion_path = output_dir / DIFFUSION_DIR
        if resume and _stage_done(output_dir / DIFFUSION_HISTORY, diffusion_path, config.diffusion.optimizer.max_steps):
            logger.warning("Stage 2 already finished in %s; skipping it.", diffusion_path)
        else:
            with Tracker(tracking, run_name="diffusion", parent=parent, fallback_dir=output_dir) as child:
                diffusion_path = train_diffusion(config, autoencoder_path, resume=resume, tracker=child)
        timings["diffusion_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        pipe = build_pipeline(autoencoder_path, diffusion_path, decode_kwargs=config.autoencoder.generate_kwargs)
        pipeline_dir = output_dir / PIPELINE_DIR
        with atomic_directory(pipeline_dir) as tmp:
            pipe.save_pretrained(tmp)
        pipe.set_progress_bar_config(disable=True)
        rows = sample_per_class(pipe, num_per_class=config.diffusion.num_samples_per_class,
                                num_inference_steps=config.diffusion.sample_inference_steps,
                                guidance_scale=sample_guidance_scale, seed=config.diffusion.seed)
        with open(output_dir / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        timings["pipeline_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started

        print(f"\nSamples ({len(rows)}, guidance {sample_guidance_scale}):")
        for row in rows:
            print(f"  [{row['class'] if row['class'] is not None else '-'}] {row['text']}")
        parent.log_table(rows, "samples.json")
        parent.log_metrics({f"time/{k}": v for k, v in timings.items()}, 0)
        parent.log_artifact(pipeline_dir, PIPELINE_DIR)
        log_pipeline_model(parent, pipeline_dir)
        (output_dir / "train_summary.json").write_text(json.dumps(
            {"pipeline": str(pipeline_dir), "samples": str(output_dir / SAMPLES_FILE),
             "mlflow_run_id": parent.run_id, "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=2))
    return pipeline_dir
