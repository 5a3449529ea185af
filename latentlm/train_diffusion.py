"""Stage 2 training: learn the latent denoiser on a trained autoencoder's latents.

`train_diffusion(config, autoencoder_path)` loads the training texts (and labels), encodes them
once into a memory-mapped latent cache (`latentlm.latent_cache`), and trains a `LatentDenoiser`
with the LD4LG objective (`latentlm.diffusion.diffusion_loss`) under accelerate: AdamW with warmup
and cosine decay, gradient clipping, an EMA of the weights (diffusers `EMAModel`), bf16 autocast
on CPU or GPU, one or several processes. Every ``sample_every`` steps a few decoded samples per
class go to MLflow as a table; atomic checkpoints make ``resume=True`` repeat the uninterrupted run
exactly. The result is ``<output_dir>/diffusion`` with ``denoiser/`` (EMA weights) and ``scheduler/``.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from latentlm.config import RunConfig
from latentlm.data import load_text_dataset
from latentlm.diffusion import (
    DENOISER_SIZES,
    LatentDenoiser,
    TimestepImportanceSampler,
    diffusion_loss,
    make_noise_scheduler,
)
from latentlm.latent_cache import build_latent_cache
from latentlm.text_autoencoder import CONFIG_NAME as AUTOENCODER_CONFIG_NAME
from latentlm.text_autoencoder import TextAutoencoder
from latentlm.tracking import Tracker
from latentlm.training import (
    run_fingerprint,
    write_json_atomic,
    CheckpointManager,
    atomic_directory,
    batch_indices,
    check_finite,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    seed_step,
)

logger = logging.getLogger(__name__)

__all__ = ["train_diffusion", "resolve_class_labels", "build_denoiser", "sample_texts"]

FINAL_DIR = "diffusion"
CHECKPOINT_DIR = "diffusion_training"
HISTORY_FILE = "diffusion_history.json"
CACHE_DIR = "latent_cache"

_DENOISER_ARGS = set(inspect.signature(LatentDenoiser.__init__).parameters) - {"self"}


def _check_autoencoder_path(autoencoder_path: str | Path) -> Path:
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


def resolve_class_labels(
    raw_labels: Sequence[Any] | None, class_names: Sequence[str] | None = None
) -> tuple[list[int] | None, list[str]]:
    """Dataset labels -> (class ids, class names).

    Without ``class_names`` the classes are the distinct labels, sorted (numbers numerically).
    With ``class_names`` every label must be one of them, else a ValueError lists the strays.
    """
    if raw_labels is None:
        if class_names:
            raise ValueError(
                f"diffusion.denoiser.class_names={list(class_names)} but the data have no labels: set "
                "data.label_column to the column holding them (or drop class_names for an unconditional model)."
            )
        return None, []
    missing = [i for i, label in enumerate(raw_labels) if label is None or (isinstance(label, str) and not label)]
    if missing:
        raise ValueError(f"{len(missing)} training examples have no label (first rows: {missing[:5]}).")
    as_str = [str(label) for label in raw_labels]
    if class_names is None:
        distinct = set(raw_labels)
        ordered = sorted(distinct, key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
        class_names = [str(v) for v in ordered]
    class_names = [str(name) for name in class_names]
    index = {name: i for i, name in enumerate(class_names)}
    strays = sorted({label for label in as_str if label not in index})
    if strays:
        raise ValueError(
            f"Labels {strays[:10]} are not in the class list {class_names}. Fix the data or set "
            "diffusion.denoiser.class_names to include them."
        )
    return [index[label] for label in as_str], class_names


def build_denoiser(config: RunConfig, num_latents: int, latent_dim: int, class_names: list[str]) -> LatentDenoiser:
    """The denoiser of ``config.diffusion`` for latents ``[N, D]`` and these classes (validated)."""
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
    overrides.update(num_latents=num_latents, latent_dim=latent_dim, num_classes=len(class_names),
                     class_names=list(class_names) or None)
    overrides.setdefault("self_conditioning", cfg.self_conditioning_prob > 0)
    return LatentDenoiser.from_size(cfg.denoiser_size, **overrides)


@torch.no_grad()
def sample_texts(text_autoencoder: TextAutoencoder, denoiser: LatentDenoiser, scheduler, class_names: list[str],
                 num_per_class: int, num_inference_steps: int, seed: int = 0,
                 decode_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A few decoded samples per class (or unconditional) through `LatentTextDiffusionPipeline` (DDIM)."""
    from latentlm.pipelines import LatentTextDiffusionPipeline

    was_training = denoiser.training
    denoiser.eval()
    pipe = LatentTextDiffusionPipeline(
        tokenizer=text_autoencoder.tokenizer, language_model=text_autoencoder.language_model,
        autoencoder=text_autoencoder.autoencoder, denoiser=denoiser,
        scheduler=DDIMScheduler.from_config(scheduler.config), max_length=text_autoencoder.max_length,
        decode_kwargs=decode_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    rows: list[dict[str, Any]] = []
    for name in class_names or [None]:
        generator = torch.Generator().manual_seed(seed)
        out = pipe(num_samples=num_per_class, class_labels=name, num_inference_steps=num_inference_steps,
                   generator=generator)
        rows.extend({"class": name if name is not None else "", "text": text} for text in out.texts)
    denoiser.train(was_training)
    return rows


def _load_training_data(config: RunConfig) -> tuple[list[str], list[Any] | None]:
    data = config.data
    ds = load_text_dataset(data, data.train_split, data.max_train_samples)
    texts = list(ds[data.text_column])
    labels = list(ds[data.label_column]) if data.label_column else None
    return texts, labels


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
        config: the run config (``config.diffusion``, ``config.data``, ``config.tracking``).
        autoencoder_path: a trained `TextAutoencoder` folder (``<output_dir>/autoencoder`` of stage 1).
        resume: continue from the latest checkpoint in ``<output_dir>/diffusion_training``.
        overwrite: delete checkpoints of an earlier run there instead of refusing to start.
        tracker: an open `Tracker` to log into; by default a new MLflow run is opened (and closed).
        cache_dir: where latent caches live (default ``<autoencoder_path>/latent_cache``, so every
            later run on the same autoencoder and data reuses it).
        time_budget_s: stop early after this many seconds of training steps (the final save still
            happens). For benchmarks.
    """
    cfg = config.diffusion
    opt = cfg.optimizer
    output_dir = Path(config.output_dir)
    autoencoder_path = _check_autoencoder_path(autoencoder_path)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.seed)
    is_main = accelerator.is_main_process

    # --- data and classes (validated before anything expensive)
    texts, raw_labels = _load_training_data(config)
    labels, class_names = resolve_class_labels(raw_labels, cfg.denoiser.get("class_names"))

    # --- latents, encoded once (main process), then memory-mapped by every process
    text_autoencoder = TextAutoencoder.from_pretrained(autoencoder_path)
    cache_root = Path(cache_dir) if cache_dir is not None else autoencoder_path / CACHE_DIR
    if is_main:
        text_autoencoder.to(accelerator.device)  # encodes the cache here, decodes samples later
        cache = build_latent_cache(text_autoencoder, texts, cache_root, labels=labels, class_names=class_names,
                                   show_progress=True)
    accelerator.wait_for_everyone()
    if not is_main:
        cache = build_latent_cache(text_autoencoder, texts, cache_root, labels=labels, class_names=class_names,
                                   show_progress=False)  # finds the main process's cache by its key
        del text_autoencoder  # other processes never decode

    # --- model, objective, optimizer
    denoiser = build_denoiser(config, cache.num_latents, cache.latent_dim, class_names)
    denoiser.to(accelerator.device)
    scheduler = make_noise_scheduler(cfg.schedule, cfg.prediction_type, cfg.num_train_timesteps)
    optimizer = make_optimizer(denoiser.parameters(), opt)
    lr_scheduler = make_lr_scheduler(optimizer, opt)
    # The lr scheduler is not prepared: batch_size is the global batch, so it steps once per step.
    train_model, optimizer = accelerator.prepare(denoiser, optimizer)
    # EMA warm-up (decay 1 - (1 + step)^-2/3, capped at ema_decay): short runs still get a useful average.
    ema = EMAModel(denoiser.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True,
                   model_cls=LatentDenoiser, model_config=denoiser.config)
    importance = (
        TimestepImportanceSampler(cfg.num_train_timesteps) if cfg.timestep_sampling == "importance" else None
    )

    checkpoints = CheckpointManager(output_dir / CHECKPOINT_DIR, keep_last=cfg.keep_last_checkpoints,
                                    fingerprint=run_fingerprint(cfg, config.data, str(Path(autoencoder_path).resolve())))
    modules = {"denoiser": denoiser}
    start_step, history, train_time = 0, [], 0.0
    latest = checkpoints.prepare(resume, overwrite) if is_main else None
    accelerator.wait_for_everyone()
    if resume and not is_main:
        latest = checkpoints.latest()
    if resume:
        if latest is None:
            if is_main:
                logger.warning("--resume: no checkpoint in %s; starting from step 0.", checkpoints.root)
        else:
            state = checkpoints.load(latest, modules, optimizer, lr_scheduler, ema=ema)
            start_step = state["step"]
            extra = state["extra_state"]
            history = extra.get("history", [])
            train_time = float(extra.get("train_time_s", 0.0))
            if importance is not None and "importance" in extra:
                saved = extra["importance"]  # JSON lists; float64 so the loss history is restored bit for bit
                importance.load_state_dict({"loss_sq_ema": torch.tensor(saved["loss_sq_ema"], dtype=torch.float64),
                                            "seen": torch.tensor(saved["seen"], dtype=torch.bool)})
            if is_main:
                logger.warning("Resumed from %s (step %d).", latest, start_step)

    def extra_state() -> dict[str, Any]:
        state: dict[str, Any] = {"history": history, "train_time_s": train_time}
        if importance is not None:
            state["importance"] = {k: v.tolist() for k, v in importance.state_dict().items()}
        return state

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(config.tracking, run_name=config.tracking.run_name or "train-diffusion",
                          fallback_dir=output_dir, active=is_main, resume=resume)
        tracker.start()
    try:
        if is_main and start_step == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            config.save(output_dir / "config.yaml")
            tracker.log_params(config.to_dict())
            tracker.log_params({
                "diffusion.autoencoder_path": str(autoencoder_path),
                "diffusion.latent_cache": str(cache.path),
                "diffusion.num_train_examples": len(cache),
                "diffusion.class_names": ",".join(class_names) or "(unconditional)",
                "diffusion.num_parameters": sum(p.numel() for p in denoiser.parameters()),
            })
            tracker.log_artifact(output_dir / "config.yaml")

        def log_samples(step: int) -> None:
            if not is_main:
                return
            # Sample with the EMA weights (what is saved), then put the training weights back.
            ema.store(denoiser.parameters())
            ema.copy_to(denoiser.parameters())
            try:
                rows = sample_texts(text_autoencoder, denoiser, scheduler, class_names, cfg.num_samples_per_class,
                                    cfg.sample_inference_steps, seed=cfg.seed,
                                    decode_kwargs=config.autoencoder.generate_kwargs or None)
            finally:
                ema.restore(denoiser.parameters())
            tracker.log_table([{"step": step, **row} for row in rows], f"samples/step_{step:08d}.json")
            history.append({"step": step, "samples": rows[: 2 * max(1, len(class_names))]})

        progress = tqdm(range(start_step, opt.max_steps), initial=start_step, total=opt.max_steps,
                        desc="train-diffusion", disable=not is_main)
        train_model.train()
        done = start_step
        running: list[float] = []
        per_process = opt.batch_size // accelerator.num_processes
        for step in progress:
            tick = time.perf_counter()
            indices = batch_indices(len(cache), opt.batch_size, step, cfg.seed, accelerator.process_index,
                                    accelerator.num_processes)
            latents, batch_labels = cache.batch(indices, accelerator.device)
            generator = seed_step(cfg.seed, step, accelerator.process_index)
            timesteps = weights = None
            if importance is not None:
                timesteps, weights = importance.sample(per_process, accelerator.device, generator=generator)
            with accelerator.autocast():
                losses = diffusion_loss(
                    train_model, scheduler, latents, batch_labels,
                    self_conditioning_prob=cfg.self_conditioning_prob, label_dropout_prob=cfg.label_dropout_prob,
                    loss_type=cfg.loss_type, timesteps=timesteps, generator=generator, reduction="none",
                )
            loss = (losses * weights).mean() if weights is not None else losses.mean()
            # The same value on every process, so a NaN anywhere stops all of them (no hung all-reduce).
            global_loss = accelerator.reduce(loss.detach().float(), reduction="mean")
            check_finite(global_loss, step)
            accelerator.backward(loss)
            if opt.max_grad_norm and opt.max_grad_norm > 0:
                accelerator.clip_grad_norm_(denoiser.parameters(), opt.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(denoiser.parameters())
            if importance is not None:
                all_t = accelerator.gather(timesteps)
                all_losses = accelerator.gather(losses.detach().float())
                importance.update(all_t, all_losses)
            train_time += time.perf_counter() - tick
            running.append(global_loss.item())
            done = step + 1
            if done % cfg.log_every == 0 or done == opt.max_steps:
                mean_loss = sum(running) / len(running)
                running = []
                tracker.log_metrics({"train/loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                                     "ema_decay": ema.cur_decay_value or 0.0,
                                     "train/steps_per_s": (done - start_step) / max(train_time, 1e-9)}, done)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
            out_of_time = time_budget_s is not None and train_time >= time_budget_s
            if cfg.sample_every and done % cfg.sample_every == 0 and done != opt.max_steps:
                log_samples(done)
            if cfg.save_every and done % cfg.save_every == 0 and done != opt.max_steps:
                if is_main:
                    checkpoints.save(done, modules, optimizer, lr_scheduler, ema=ema, extra_state=extra_state())
                accelerator.wait_for_everyone()
            if out_of_time:
                if is_main:
                    logger.warning("Time budget of %.0f s reached after %d steps.", time_budget_s, done)
                break
        progress.close()
        final_step = done
        if cfg.sample_every:
            log_samples(final_step)

        final = output_dir / FINAL_DIR
        if is_main:
            # The EMA weights are the model (LD4LG samples with them).
            ema.store(denoiser.parameters())
            ema.copy_to(denoiser.parameters())
            with atomic_directory(final) as tmp:
                accelerator.unwrap_model(train_model).save_pretrained(tmp / "denoiser", safe_serialization=True)
                scheduler.save_pretrained(tmp / "scheduler")
            ema.restore(denoiser.parameters())
            write_json_atomic(output_dir / HISTORY_FILE, 
                {"final_step": final_step, "train_time_s": round(train_time, 2), "latent_cache": str(cache.path),
                 "class_names": class_names, "history": history})
            tracker.log_artifact(output_dir / HISTORY_FILE)
        accelerator.wait_for_everyone()
    except BaseException:
        if own_tracker:
            tracker.close(status="FAILED")
        raise
    if own_tracker:
        tracker.close()
    return final
