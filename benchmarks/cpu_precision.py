"""bf16 autocast against fp32 on this machine's CPU, and what ``mixed_precision: auto`` chooses here.

Times a matrix product (the work of every linear layer) and a training step of the `small` denoiser
(384 wide, 6 layers, 32 x 64 latents, v-prediction with self-conditioning, AdamW) in fp32 and under
bf16 autocast, alternating the two for ``--rounds`` rounds so that both see the same machine load.
On a CPU with AVX512-BF16 or AMX bf16 is the faster; on one without (AVX2 only) PyTorch emulates
bf16 products and is far slower than fp32, which is why the configs say ``auto``.

    python benchmarks/cpu_precision.py [--threads 2] [--rounds 2] [--batch-size 16]

Writes benchmarks/results/cpu_precision.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path
import torch
from latentlm.diffusion import LatentDenoiser, diffusion_loss, make_noise_scheduler

from latentlm.hardware import has_native_bf16
from latentlm.training.precision import resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]


def precision(name: str):
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_matmul(name: str, rows: int = 512, width: int = 768, repeats: int = 5) -> float:
    """Seconds per ``[rows, width] @ [width, width]`` under the precision ``name``."""
    a, b = torch.randn(rows, width), torch.randn(width, width)
    with precision(name):
        a @ b  # warm-up
        tick = time.perf_counter()
        for _ in range(repeats):
            a @ b
    return (time.perf_counter() - tick) / repeats


def time_denoiser_step(name: str, batch_size: int, steps: int) -> float:
    """Seconds per stage-2 training step (forward, backward, AdamW) under the precision ``name``."""
    torch.manual_seed(0)
    denoiser = LatentDenoiser.from_size("small", latent_dim=64, num_latents=32, num_classes=4)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
    scheduler = make_noise_scheduler()
    latents = torch.randn(batch_size, 32, 64)
    labels = torch.randint(0, 4, (batch_size,))

    def step():
        with precision(name):
            loss = diffusion_loss(denoiser, scheduler, latents, class_labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tick) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="denoiser training batch")
    parser.add_argument("--steps", type=int, default=1, help="timed denoiser steps per precision and round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_precision.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = ("no", "bf16")
    matmul = {name: [] for name in names}
    denoiser = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            matmul[name].append(time_matmul(name))
            denoiser[name].append(time_denoiser_step(name, args.batch_size, args.steps))
    flops = 2 * 512 * 768 * 768
    best = {name: min(matmul[name]) for name in names}
    step = {name: min(denoiser[name]) for name in names}
    result = {
        "benchmark": "cpu_precision",
        "command": "python benchmarks/cpu_precision.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": has_native_bf16("cpu"),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "auto_resolves_to": resolve_mixed_precision("auto", "cpu"),
        "matmul_gflops": {name: round(flops / best[name] / 1e9, 2) for name in names},
        "matmul_bf16_slowdown": round(best["bf16"] / best["no"], 1),
        "denoiser_step_s": {name: round(step[name], 3) for name in names},
        "denoiser_bf16_slowdown": round(step["bf16"] / step["no"], 2),
        "denoiser_batch_size": args.batch_size,
        "raw": {"matmul_s": matmul, "denoiser_step_s": denoiser},
    }
    print(json.dumps(result, indent=1))
    common.write_results("", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
