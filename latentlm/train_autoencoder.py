"""Stage 1 training: learn the latent autoencoder (and optionally tune the decoder).

`train_autoencoder(config)` loads the data, caches the frozen encoder's states once, trains with
accelerate (AdamW, warmup + decay, clipping, bf16 autocast on CPU or GPU), evaluates
reconstruction BLEU / exact match every ``eval_every`` steps, writes atomic checkpoints (resume
repeats the uninterrupted run exactly), logs to MLflow and saves the final
`TextAutoencoder` to ``<output_dir>/autoencoder``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentlm.autoencoder.text_codec import DEFAULT_GENERATE_KWARGS
from latentlm.config import RunConfig
from latentlm.data import load_texts
from latentlm.metrics import exact_match, reconstruction_bleu
from latentlm.text_autoencoder import TextAutoencoder
from latentlm.tracking import Tracker
from latentlm.training import (
    run_fingerprint,
    write_json_atomic,
    CheckpointManager,
    atomic_directory,
    attention_kernel,
    batch_indices,
    check_finite,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    seed_step,
)

logger = logging.getLogger(__name__)

__all__ = ["train_autoencoder", "EncoderCache", "build_encoder_cache", "evaluate_reconstruction"]

FINAL_DIR = "autoencoder"
CHECKPOINT_DIR = "autoencoder_training"
HISTORY_FILE = "autoencoder_history.json"


@dataclass
class EncoderCache:
    """Frozen-encoder states of a whole dataset, computed once.

    Stored unpadded per example (``states[i]`` is [L_i, d_model]) so a batch is padded only to its
    own longest text; ``input_ids[i]`` are the (truncated) token ids, the reconstruction targets.
    """

    states: list[torch.Tensor]
    input_ids: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> hidden_states [B, L, d], attention_mask [B, L], input_ids [B, L] (pad id 0 where masked)."""
        length = max(self.states[i].shape[0] for i in indices)
        d = self.states[indices[0]].shape[1]
        hidden = torch.zeros(len(indices), length, d, dtype=self.states[indices[0]].dtype)
        mask = torch.zeros(len(indices), length, dtype=torch.long)
        ids = torch.zeros(len(indices), length, dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.states[i].shape[0]
            hidden[row, :n] = self.states[i]
            mask[row, :n] = 1
            ids[row, :n] = self.input_ids[i]
        return hidden.to(device), mask.to(device), ids.to(device)


@torch.no_grad()
def build_encoder_cache(model: TextAutoencoder, texts: list[str], batch_size: int = 64,
                        dtype: torch.dtype = torch.float32, show_progress: bool = True,
                        autocast=None) -> EncoderCache:
    """Run the frozen encoder once over `texts` (batched by length, in a fixed order).

    `autocast` is an optional context-manager factory (e.g. ``accelerator.autocast``) so that a
    bf16 run also encodes in bf16 (about 2x faster on CPU).
    """
    encodings = model.token_ids(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i]))
    states: list[torch.Tensor | None] = [None] * len(texts)
    pad = model.tokenizer.pad_token_id
    was_training = model.language_model.training
    model.language_model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="caching encoder states", disable=not show_progress,
                      leave=False):
        chunk = order[start : start + batch_size]
        length = max(len(encodings[i]) for i in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(encodings[i])] = torch.tensor(encodings[i])
            mask[row, : len(encodings[i])] = 1
        with autocast() if autocast is not None else contextlib.nullcontext():
            hidden = model.encoder_states(ids.to(model.device), mask.to(model.device))
        hidden = hidden.to("cpu", dtype)
        for row, i in enumerate(chunk):
            states[i] = hidden[row, : len(encodings[i])].clone()
    model.language_model.train(was_training)
    return EncoderCache(states=states, input_ids=[torch.tensor(e) for e in encodings])


def normalized_reference(tokenizer, text: str, max_length: int, add_special_tokens: bool = True) -> str:
    """What a perfect reconstruction can be: the text after tokenization (case folding, truncation)."""
    ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


@torch.no_grad()
def evaluate_reconstruction(model: TextAutoencoder, texts: list[str], batch_size: int = 64,
                            num_beams: int = 4, num_examples: int = 16) -> dict[str, Any]:
    """Reconstruction BLEU (sacrebleu, 0-100) and exact-match rate of `texts`.

    References are the texts as the tokenizer can represent them (``normalized_reference``), so the
    score measures the autoencoder, not the tokenizer's case folding or truncation.
    """
    was_training = model.training
    model.eval()
    generate_kwargs = dict(DEFAULT_GENERATE_KWARGS, max_length=model.max_length + 8, num_beams=num_beams)
    if num_beams == 1:  # greedy: the LD4LG repetition controls are beam-search heuristics
        generate_kwargs.update(no_repeat_ngram_size=0, repetition_penalty=1.0)
    references = [normalized_reference(model.tokenizer, t, model.max_length, not model.causal) for t in texts]
    hypotheses: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        hypotheses.extend(model.decode(model.encode(chunk), **generate_kwargs))
    model.train(was_training)
    bleu = reconstruction_bleu(hypotheses, references)
    exact = exact_match(hypotheses, references)
    examples = [
        {"reference": r, "reconstruction": h, "exact": h == r}
        for r, h in list(zip(references, hypotheses))[:num_examples]
    ]
    return {"bleu": bleu, "exact_match": exact, "examples": examples}


def _param_groups(model: TextAutoencoder, learning_rate: float, decoder_lr_scale: float) -> list[dict]:
    params = model.trainable_parameters()
    groups = [{"params": params["autoencoder"], "lr": learning_rate, "name": "autoencoder"}]
    if params["language_model"]:
        groups.append(
            {"params": params["language_model"], "lr": learning_rate * decoder_lr_scale, "name": "language_model"}
        )
    return groups


def train_autoencoder(config: RunConfig, resume: bool = False, tracker: Tracker | None = None, *,
                      time_budget_s: float | None = None, overwrite: bool = False) -> Path:
    """Train stage 1 as configured; returns ``<output_dir>/autoencoder`` (`TextAutoencoder.from_pretrained`).

    Args:
        resume: continue from the latest checkpoint in ``<output_dir>/autoencoder_training``.
        overwrite: delete checkpoints of an earlier run there instead of refusing to start
            (see `CheckpointManager.prepare`).
        tracker: an open `Tracker` to log into; by default a new MLflow run is opened (and closed).
        time_budget_s: stop early once this many seconds were spent in training steps (evaluation
            time not counted); the final evaluation and save still happen. For benchmarks.
    """
    cfg = config.autoencoder
    opt = cfg.optimizer
    data = config.data
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.seed)
    is_main = accelerator.is_main_process

    # --- data (validated before any model is built, so bad input fails fast)
    train_texts = load_texts(data, data.train_split, data.max_train_samples)
    val_texts = (
        load_texts(data, data.validation_split, data.max_eval_samples) if data.validation_split else []
    )
    if opt.batch_size > len(train_texts) and is_main:
        logger.warning("batch_size %d exceeds the %d training texts; batches repeat texts.", opt.batch_size,
                       len(train_texts))

    # --- model
    model = TextAutoencoder.from_backbone(
        cfg.backbone, decoder=cfg.decoder, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules, num_latents=cfg.num_latents,
        latent_dim=cfg.latent_dim, num_compression_layers=cfg.num_compression_layers,
        num_reconstruction_layers=cfg.num_reconstruction_layers, head_dim=cfg.head_dim,
        normalize_latents=cfg.normalize_latents, dropout=cfg.dropout, max_length=cfg.max_length,
        cross_attention_init=cfg.cross_attention_init, plm_dropout=cfg.plm_dropout,
        context_positions=cfg.context_positions, query_init_std=cfg.query_init_std,
        memory_tokens_per_latent=cfg.memory_tokens_per_latent, tokens_per_query=cfg.tokens_per_query,
        context_layers=cfg.context_layers, prompt_template=cfg.prompt_template, alignment_weight=cfg.alignment_weight,
    )
    model.to(accelerator.device)
    num_truncated = sum(len(ids) > cfg.max_length for ids in model.token_ids(train_texts, truncation=False))
    if is_main:
        logger.warning(
            "%d of %d training texts (%.1f%%) are longer than max_length=%d tokens and are truncated.",
            num_truncated, len(train_texts), 100 * num_truncated / len(train_texts), cfg.max_length,
        )

    cache_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    tick = time.perf_counter()
    cache = build_encoder_cache(model, train_texts, dtype=cache_dtype, show_progress=is_main,
                                autocast=accelerator.autocast)
    cache_seconds = time.perf_counter() - tick

    optimizer = make_optimizer(_param_groups(model, opt.learning_rate, cfg.decoder_lr_scale), opt)
    lr_scheduler = make_lr_scheduler(optimizer, opt)
    # The scheduler is not passed to prepare(): batch_size is the global batch, so it steps once per step.
    train_model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    checkpoints = CheckpointManager(output_dir / CHECKPOINT_DIR, keep_last=cfg.keep_last_checkpoints,
                                    fingerprint=run_fingerprint(cfg, config.data))
    modules = {"autoencoder": model.autoencoder, "language_model": model.language_model}
    start_step, history, loss_curve, resumed_train_time = 0, [], [], 0.0
    latest = checkpoints.prepare(resume, overwrite) if is_main else None
    accelerator.wait_for_everyone()
    if resume and not is_main:
        latest = checkpoints.latest()
    if resume:
        if latest is None:
            if is_main:
                logger.warning("--resume: no checkpoint in %s; starting from step 0.", checkpoints.root)
        else:
            state = checkpoints.load(latest, modules, optimizer, lr_scheduler)
            start_step = state["step"]
            history = state["extra_state"].get("history", [])
            resumed_train_time = float(state["extra_state"].get("train_time_s", 0.0))
            loss_curve = state["extra_state"].get("loss_curve", [])
            if is_main:
                logger.warning("Resumed from %s (step %d).", latest, start_step)

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(config.tracking, run_name=config.tracking.run_name or "train-autoencoder",
                          fallback_dir=output_dir, active=is_main, resume=resume)
        tracker.start()
    try:
        if is_main and start_step == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            config.save(output_dir / "config.yaml")
            tracker.log_params(config.to_dict())
            tracker.log_params({"autoencoder.num_truncated_train_texts": num_truncated,
                                "autoencoder.num_train_texts": len(train_texts)})
            tracker.log_artifact(output_dir / "config.yaml")

        def run_eval(step: int) -> None:
            if not val_texts or not is_main:
                return
            result = evaluate_reconstruction(model, val_texts, num_beams=cfg.eval_num_beams,
                                             num_examples=cfg.num_eval_examples)
            entry = {"step": step, "bleu": result["bleu"], "exact_match": result["exact_match"],
                     "train_time_s": round(train_time, 1)}
            history.append(entry)
            tracker.log_metrics({"eval/bleu": result["bleu"], "eval/exact_match": result["exact_match"]}, step)
            tracker.log_table(result["examples"], f"reconstructions/step_{step:08d}.json")
            logger.warning("step %d: reconstruction BLEU %.2f, exact match %.3f", step, result["bleu"],
                           result["exact_match"])

        lengths = tuple(len(ids) for ids in cache.input_ids) if cfg.group_by_length else None
        train_time = resumed_train_time
        progress = tqdm(range(start_step, opt.max_steps), initial=start_step, total=opt.max_steps,
                        desc="train-autoencoder", disable=not is_main)
        train_model.train()
        done = start_step
        running = []
        for step in progress:
            tick = time.perf_counter()
            indices = batch_indices(len(cache), opt.batch_size, step, cfg.seed, accelerator.process_index,
                                    accelerator.num_processes, lengths=lengths)
            hidden, mask, ids = cache.batch(indices, accelerator.device)
            labels = model.make_labels(ids, mask)
            seed_step(cfg.seed, step, accelerator.process_index)
            with accelerator.autocast(), attention_kernel(accelerator.device):
                loss = train_model(hidden, mask, labels, reconstruction=step >= cfg.alignment_warmup_steps)
            check_finite(loss, step)
            accelerator.backward(loss)
            if opt.max_grad_norm and opt.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, opt.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_time += time.perf_counter() - tick
            running.append(loss.detach().float().item())
            done = step + 1
            if done % cfg.log_every == 0 or done == opt.max_steps:
                mean_loss = sum(running) / len(running)
                running = []
                lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                tracker.log_metrics({"train/loss": mean_loss, **lrs}, done)
                loss_curve.append({"step": done, "loss": mean_loss, "train_time_s": round(train_time, 1)})
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            out_of_time = time_budget_s is not None and train_time >= time_budget_s
            if cfg.eval_every and done % cfg.eval_every == 0 and done != opt.max_steps and not out_of_time:
                run_eval(done)
            if cfg.save_every and (done % cfg.save_every == 0 or done == opt.max_steps or out_of_time):
                if is_main:
                    checkpoints.save(done, modules, optimizer, lr_scheduler, extra_state={"history": history, "loss_curve": loss_curve, "train_time_s": train_time})
                accelerator.wait_for_everyone()
            if out_of_time:
                if is_main:
                    logger.warning("Time budget of %.0f s reached after %d steps.", time_budget_s, done)
                break
        progress.close()
        final_step = done
        run_eval(final_step)

        final = output_dir / FINAL_DIR
        if is_main:
            unwrapped = accelerator.unwrap_model(train_model)
            with atomic_directory(final) as tmp:
                unwrapped.save_pretrained(tmp)
            write_json_atomic(output_dir / HISTORY_FILE, 
                {"final_step": final_step, "train_time_s": round(train_time, 1),
                 "encoder_cache_s": round(cache_seconds, 1), "num_truncated_train_texts": num_truncated, "num_train_texts": len(train_texts),
                 "history": history, "loss_curve": loss_curve})
            tracker.log_artifact(output_dir / HISTORY_FILE)
            if history:
                tracker.log_metrics({"final/bleu": history[-1]["bleu"],
                                     "final/exact_match": history[-1]["exact_match"]}, final_step)
        accelerator.wait_for_everyone()
    except BaseException:
        if own_tracker:
            tracker.close(status="FAILED")
        raise
    if own_tracker:
        tracker.close()
    return final
