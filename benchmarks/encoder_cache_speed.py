"""What the on-disk encoder cache saves the stages that follow stage 1.

    python benchmarks/encoder_cache_speed.py --autoencoder outputs/snippets-fp32/autoencoder \
        --data ../shared/data/snippets --num-texts 2048

On the first ``--num-texts`` training texts, in one precision, each round times (in temporary folders,
so nothing from an earlier round is reused):
- writing the encoder cache (`latentlm.training.encoder_cache.build_encoder_cache`: what stage 1 does once);
- opening it again by its key (what the decoder tuning and a resumed stage 1 do instead of encoding);
- the latent cache from the texts (`build_latent_cache` without an encoder cache: the encoder runs);
- the latent cache from the encoder cache (only the compression network runs).
It writes the seconds, the speedups and the largest difference between the two routes' latents to
``benchmarks/results/encoder_cache_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--num-texts", type=int, default=2048)
    parser.add_argument("--mixed-precision", default="auto", help="auto | no | bf16 (auto: bf16 where native)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encoder_cache_speed.json"))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    from latentlm.data.loading import read_texts
    from latentlm.training.encoder_cache import build_encoder_cache
    from latentlm.training.latent_cache import build_latent_cache
    from latentlm.training.precision import resolve_mixed_precision

    precision = resolve_mixed_precision(args.mixed_precision, torch.device("cpu"))
    texts, _ = read_texts(Path(args.data) / "train.jsonl", "text")
    texts = texts[: args.num_texts]
    model = TextAutoencoder.from_pretrained(args.autoencoder).eval()
    names = ("write encoder cache", "open encoder cache", "latent cache from texts", "latent cache from encoder cache")
    seconds: dict[str, list[float]] = {name: [] for name in names}

    @contextlib.contextmanager
    def timed(name):
        tick = time.perf_counter()
        yield
        seconds[name].append(time.perf_counter() - tick)

    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            with timed(names[0]):
                encoder_cache = build_encoder_cache(model, texts, tmp / "encoder", precision, show_progress=False)
            with timed(names[1]):
                build_encoder_cache(model, texts, tmp / "encoder", precision, show_progress=False)
            with timed(names[2]):
                plain = build_latent_cache(model, texts, tmp / "a", show_progress=False, mixed_precision=precision)
            with timed(names[3]):
                cached = build_latent_cache(
                    model,
                    texts,
                    tmp / "b",
                    show_progress=False,
                    mixed_precision=precision,
                    encoder_cache_dir=tmp / "encoder",
                )
            difference = float(np.abs(np.asarray(plain.latents) - np.asarray(cached.latents)).max())
            num_tokens = int(encoder_cache.offsets[-1])
            cache_bytes = sum(f.stat().st_size for f in encoder_cache.path.iterdir())
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "benchmark": "encoder_cache_speed",
        "command": "python benchmarks/encoder_cache_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "autoencoder": args.autoencoder,
        "num_texts": len(texts),
        "num_tokens": num_tokens,
        "encoder_cache_bytes": cache_bytes,
        "mixed_precision": precision,
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "seconds": {name: [round(s, 2) for s in values] for name, values in seconds.items()},
        "encoder_cache_open_speedup": best[names[0]] / best[names[1]],
        "latent_cache_speedup": best[names[2]] / best[names[3]],
        "latent_max_abs_difference": difference,
    }
    print(json.dumps(result, indent=1))
    common.write_results("", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
