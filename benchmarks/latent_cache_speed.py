"""How fast stage 2's latent cache is written in fp32 and under bf16 autocast, and how far apart the
latents are.

    python benchmarks/latent_cache_speed.py --autoencoder outputs/stage1-long/autoencoder \
        --data ../shared/data/snippets --num-texts 1024

Encodes the first ``--num-texts`` training texts with `latentlm.training.latent_cache.build_latent_cache`
(into a temporary folder, so nothing is reused), alternating the two precisions for ``--repeats``
rounds so that both see the same machine load, and writes texts/s for each, their ratio and the
relative RMS difference of the latents to ``benchmarks/results/latent_cache_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True, help="a trained TextAutoencoder folder")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "snippets"))
    parser.add_argument("--num-texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latent_cache_speed.json"))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    from latentlm.data.loading import read_texts
    from latentlm.training.latent_cache import build_latent_cache

    texts, _ = read_texts(Path(args.data) / "train.jsonl", "text")
    texts = texts[: args.num_texts]
    model = TextAutoencoder.from_pretrained(args.autoencoder).eval()
    seconds: dict[str, list[float]] = {"no": [], "bf16": []}
    latents = {}
    for _ in range(args.repeats):
        for precision in seconds:
            with tempfile.TemporaryDirectory() as tmp:
                tick = time.perf_counter()
                cache = build_latent_cache(model, texts, tmp, show_progress=False, mixed_precision=precision)
                seconds[precision].append(time.perf_counter() - tick)
                latents[precision] = np.array(cache.latents)
    full, half = latents["no"], latents["bf16"]
    rows = {
        precision: {"seconds": [round(s, 1) for s in values], "texts_per_second": len(texts) / min(values)}
        for precision, values in seconds.items()
    }
    result = {
        "benchmark": "latent_cache_speed",
        "command": "python benchmarks/latent_cache_speed.py " + " ".join(argv or sys.argv[1:]),
        "autoencoder": args.autoencoder,
        "num_texts": len(texts),
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "fp32": rows["no"],
        "bf16": rows["bf16"],
        "bf16_speedup": rows["bf16"]["texts_per_second"] / rows["no"]["texts_per_second"],
        "relative_rms_difference": float(np.sqrt(((half - full) ** 2).mean() / (full**2).mean())),
    }
    print(json.dumps(result, indent=1))
    common.write_results("", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
