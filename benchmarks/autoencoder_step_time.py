"""Benchmark: seconds per stage 1 training step on CPU, side by side in one run.

MiniLM BERT2BERT (full decoder, bf16 autocast) on the snippets data, with the frozen encoder's
states cached as `train_autoencoder` does. Compares the two CPU speed-ups of the training loop:

- length-grouped batches (`autoencoder.group_by_length`) against random batches: a batch is padded
  to its longest text, so random batches of short texts spend much of a step on padding;
- SDPA's math kernel (`latentlm.training.loop.attention_kernel`, used on CPU) against the flash kernel.

Settings are interleaved round by round so that load from other jobs hits all of them alike.

    python benchmarks/autoencoder_step_time.py [--batch-size 32] [--steps 8] [--rounds 2] [--threads 2]

Writes benchmarks/results/autoencoder_step_time.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # benchmarks/common.py: the script's folder is on sys.path
import torch  # noqa: E402
from latentlm.autoencoder.text_autoencoder import TextAutoencoder  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from latentlm.training.encoder_cache import build_encoder_cache  # noqa: E402
from latentlm.training.loop import batch_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "snippets" / "train.jsonl"))
    parser.add_argument("--num-texts", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "autoencoder_step_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with open(args.data) as f:
        texts = [json.loads(line)["text"] for line in f][: args.num_texts]
    model = TextAutoencoder.from_backbone("minilm", decoder="full", plm_dropout=0.0, max_length=64)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cache_dir = tempfile.TemporaryDirectory()  # removed at exit
    cache = build_encoder_cache(model, texts, cache_dir.name, mixed_precision="bf16", show_progress=False)
    lengths = cache.lengths
    params = [p for group in model.trainable_parameters().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model.train()

    settings = {
        "random batches, flash attention": (False, None),
        "random batches, math attention": (False, SDPBackend.MATH),
        "length-grouped batches, flash attention": (True, None),
        "length-grouped batches, math attention": (True, SDPBackend.MATH),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    padded: dict[str, list[float]] = {name: [] for name in settings}
    step = 0
    for _ in range(args.rounds):
        for name, (grouped, backend) in settings.items():
            for k in range(args.steps + 1):  # the first step of a setting is a warm-up
                indices = batch_indices(len(cache), args.batch_size, step, seed=0, lengths=lengths if grouped else None)
                step += 1
                hidden, mask, ids = cache.batch(indices, "cpu")
                labels = model.make_labels(ids, mask)
                kernel = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
                tick = time.perf_counter()
                with bf16(), kernel:
                    loss = model(hidden, mask, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if k:
                    times[name].append(time.perf_counter() - tick)
                    padded[name].append(1 - mask.float().mean().item())
        print("round done: " + ", ".join(f"{n}: {statistics.median(t):.2f} s" for n, t in times.items()))

    baseline = statistics.median(times["random batches, flash attention"])
    results = {
        name: {
            "median_step_s": round(statistics.median(t), 3),
            "speedup_vs_random_flash": round(baseline / statistics.median(t), 2),
            "padding_fraction": round(statistics.mean(padded[name]), 3),
            "steps": len(t),
        }
        for name, t in times.items()
    }
    report = {
        "benchmark": "autoencoder_step_time",
        "model": "minilm BERT2BERT, full decoder, bf16 autocast, cached encoder states",
        "batch_size": args.batch_size,
        "num_texts": len(texts),
        "results": results,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "command": "python benchmarks/autoencoder_step_time.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("data", "result")),
    }
    for name, r in results.items():
        print(
            f"{name:42s} {r['median_step_s']:.2f} s/step  x{r['speedup_vs_random_flash']:.2f}  "
            f"padding {r['padding_fraction']:.0%}"
        )
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    common.write_results("", report, args.result)
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
