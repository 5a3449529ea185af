"""How much Gaussian noise on its latents an autoencoder's decoder tolerates.

Encodes validation texts, adds ``sigma * N(0, I)`` to the latents (normalised latents have unit
RMS per dimension, the scale the denoiser works at) and decodes them greedily; reports BLEU against
the texts per sigma. If BLEU stays high at the noise a sample's error could have, the decoder is not
what makes samples garbled.

    python benchmarks/latent_noise.py --autoencoder outputs/stage1-long/autoencoder \
        --data ../shared/data/snippets --num-texts 48

Writes benchmarks/results/latent_noise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True, help="a TextAutoencoder folder")
    parser.add_argument("--data", required=True, help="folder with validation.jsonl")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--num-texts", type=int, default=48)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.35, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latent_noise.json"))
    args = parser.parse_args(argv)

    import torch
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    from latentlm.data.loading import read_texts
    from latentlm.evaluation.metrics import reconstruction_bleu

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts, _ = read_texts(Path(args.data) / "validation.jsonl", args.text_column)
    texts = texts[: args.num_texts]
    model = TextAutoencoder.from_pretrained(args.autoencoder).eval()
    rows = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = model.encode(texts).float()
        rms = float(latents.pow(2).mean().sqrt())
        for sigma in args.sigmas:
            tick = time.perf_counter()
            decoded = model.decode(latents + sigma * torch.randn_like(latents), num_beams=1)
            rows.append(
                {
                    "sigma": sigma,
                    "bleu": round(reconstruction_bleu(decoded, texts), 2),
                    "seconds": round(time.perf_counter() - tick, 1),
                    "examples": decoded[:2],
                }
            )
            print(f"sigma {sigma:<5} BLEU {rows[-1]['bleu']:6.2f}  {decoded[1]!r}", flush=True)
    result = {
        "benchmark": "latent_noise",
        "command": "python benchmarks/latent_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "autoencoder": args.autoencoder,
        "num_texts": len(texts),
        "latent_rms": round(rms, 3),
        "decoding": "greedy, bf16 autocast",
        "references": texts[:2],
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
