"""Training throughput and peak memory of both stages, on a pipeline's own components.

Stage 1 (autoencoder): frozen PLM encoder forward (no grad) + compression/reconstruction + decoder
cross-entropy, backward and AdamW step on the trainable parameters (the autoencoder; the decoder
too with --decoder full). Stage 2 (denoiser): `diffusion_loss` (v-prediction, self-conditioning,
label dropout) on latents encoded once beforehand, backward and AdamW step.

    python benchmarks/training_throughput.py [PIPELINE_DIR] [--quick] [--mixed-precision bf16] [--data FILE]

Writes benchmarks/results/training_throughput.json and a PNG of the loss curves (under
outputs/benchmarks/), logs to MLflow.
"""

from __future__ import annotations

import contextlib
import random
import time

import common
import torch

from latentlm.config import OptimizerConfig
from latentlm.data.loading import read_texts
from latentlm.training.optimization import make_optimizer


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_steps(step_fn, num_steps: int, warmup: int, device: torch.device, examples_per_step: int) -> dict:
    for _ in range(warmup):
        step_fn()
    losses, times, tokens = [], [], 0
    with common.PeakMemory(device) as memory:
        for _ in range(num_steps):
            seconds, (loss, n_tokens) = common.timed(step_fn, device)
            losses.append(loss)
            times.append(seconds)
            tokens += n_tokens
    total = sum(times)
    return {
        "steps": num_steps,
        "batch_size": examples_per_step,
        "median_step_s": common.median(times),
        "examples_per_s": examples_per_step * num_steps / total,
        "tokens_per_s": tokens / total if tokens else None,
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "losses": losses,
    }


def stage1(pipe, texts, device, batch_size, steps, warmup, mixed_precision, decoder: str) -> dict:
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    model = TextAutoencoder(pipe.tokenizer, pipe.language_model, pipe.autoencoder, max_length=pipe.config.max_length)
    model.language_model.requires_grad_(decoder == "full")
    if decoder == "full":
        model.language_model.get_encoder().requires_grad_(False)  # the encoder stays frozen (LD4LG)
    model.autoencoder.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, OptimizerConfig(learning_rate=1e-4, batch_size=batch_size))
    rng = random.Random(0)

    def step():
        batch = model.tokenize(rng.sample(texts, batch_size))
        with autocast(device, mixed_precision):
            states = model.encoder_states(batch["input_ids"], batch["attention_mask"])
            loss = model(
                states, batch["attention_mask"], model.make_labels(batch["input_ids"], batch["attention_mask"])
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), int(batch["attention_mask"].sum())

    result = run_steps(step, steps, warmup, device, batch_size)
    result["trainable_parameters"] = sum(p.numel() for p in params)
    model.eval()
    return result


def stage2(pipe, texts, device, batch_size, steps, warmup, mixed_precision) -> dict:
    from diffusers import DDPMScheduler
    from latentlm.diffusion import diffusion_loss

    latents = torch.cat([pipe.encode(texts[i : i + 64]) for i in range(0, len(texts), 64)]).to(device)
    denoiser = pipe.denoiser
    denoiser.requires_grad_(True)
    denoiser.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_classes = denoiser.config.num_classes or 0
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, OptimizerConfig(learning_rate=2e-4, batch_size=batch_size))
    generator = torch.Generator("cpu").manual_seed(0)

    def step():
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device) if num_classes else None
        with autocast(device, mixed_precision):
            loss = diffusion_loss(denoiser, scheduler, latents[index.to(device)], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), 0

    result = run_steps(step, steps, warmup, device, batch_size)
    result["trainable_parameters"] = sum(p.numel() for p in params)
    denoiser.eval()
    return result


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="jsonl/txt training texts (default: the quickstart corpus)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per stage (default 30, quick 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size-autoencoder", type=int, default=None, help="default 64 (quick 16)")
    parser.add_argument("--batch-size-denoiser", type=int, default=None, help="default 128 (quick 64)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--decoder", default="frozen", choices=["frozen", "full"], help="stage 1: train the decoder too"
    )
    args = parser.parse_args()
    device = common.setup(args)
    pipe, folder, description = common.load_pipeline(args.pipeline, device, args.build, args.denoiser_size)
    data = args.data or str(common.tiny_corpus_dir() / "train.jsonl")
    texts, _ = read_texts(data)
    texts = texts[:5000]
    steps = args.steps or (8 if args.quick else 30)
    bs1 = args.batch_size_autoencoder or (16 if args.quick else 64)
    bs2 = args.batch_size_denoiser or (64 if args.quick else 128)

    start = time.perf_counter()
    s1 = stage1(pipe, texts, device, bs1, steps, args.warmup, args.mixed_precision, args.decoder)
    print(
        f"stage 1: {s1['examples_per_s']:.1f} texts/s, {s1['tokens_per_s']:.0f} tokens/s, "
        f"step {s1['median_step_s'] * 1000:.0f} ms (batch {bs1}), peak +{s1['peak_memory_mb']:.0f} MB",
        flush=True,
    )
    s2 = stage2(pipe, texts, device, bs2, steps, args.warmup, args.mixed_precision)
    print(
        f"stage 2: {s2['examples_per_s']:.1f} latents/s, step {s2['median_step_s'] * 1000:.0f} ms (batch {bs2}), "
        f"peak +{s2['peak_memory_mb']:.0f} MB",
        flush=True,
    )

    payload = {
        "benchmark": "training_throughput",
        "pipeline": description,
        "quick": args.quick,
        "data": data,
        "mixed_precision": args.mixed_precision,
        "decoder": args.decoder,
        "peak_memory": "CUDA max allocated above the start"
        if device.type == "cuda"
        else "peak resident set size above the start (sampled every 5 ms)",
        "model_parameters": common.model_sizes(pipe),
        "environment": common.environment(device),
        "seconds": time.perf_counter() - start,
        "autoencoder": s1,
        "denoiser": s2,
    }
    path = common.write_results("training_throughput", payload, args.out)
    png = common.plot(
        common.OUTPUTS_DIR / f"{path.stem}.png",
        [
            {
                "title": f"stage 1 loss (batch {bs1})",
                "xlabel": "step",
                "ylabel": "cross-entropy",
                "series": {"autoencoder": (list(range(1, steps + 1)), s1["losses"])},
            },
            {
                "title": f"stage 2 loss (batch {bs2})",
                "xlabel": "step",
                "ylabel": "diffusion loss",
                "series": {"denoiser": (list(range(1, steps + 1)), s2["losses"])},
            },
        ],
        f"training: {description}",
    )
    metrics = [
        ({"autoencoder/loss": a, "denoiser/loss": b}, i) for i, (a, b) in enumerate(zip(s1["losses"], s2["losses"]), 1)
    ]
    metrics.append(
        (
            {
                f"{stage}/{k}": r[k]
                for stage, r in (("autoencoder", s1), ("denoiser", s2))
                for k in ("examples_per_s", "median_step_s", "peak_memory_mb")
                if r[k] is not None
            },
            0,
        )
    )
    common.log_to_mlflow(
        args,
        "training_throughput",
        {"pipeline": description, "quick": args.quick, "mixed_precision": args.mixed_precision, "device": str(device)},
        metrics,
        [p for p in (path, png) if p is not None],
    )


if __name__ == "__main__":
    main()
