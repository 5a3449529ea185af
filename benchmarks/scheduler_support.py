"""Which diffusers schedulers sample well from a trained pipeline: every scheduler compatible with
`DDPMScheduler` (they all take its ``alphas_cumprod``), at 5, 10 and 25 steps.

A trained denoiser is what tells: with an exact denoiser every scheduler reaches the data (tests
check that), but a real one is imperfect, and a sampler that amplifies its errors ends far from the
data. The measure is the RMS of the sampled latents against the RMS of the training latents
(normalised latents: 1.0 per dimension) and their decoded texts.

    python benchmarks/scheduler_support.py outputs/snippets-shared/pipeline

Writes benchmarks/results/scheduler_support.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import common  # benchmarks/common.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("-n", "--num-samples", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scheduler_support.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch
    from latentlm.pipelines import LatentTextDiffusionPipeline

    pipe = LatentTextDiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    label = pipe.class_names[0] if pipe.class_names else None
    rows = []
    for cls in sorted(pipe.scheduler.compatibles, key=lambda c: c.__name__):
        name = cls.__name__
        for steps in args.steps:
            row = {"scheduler": name, "steps": steps}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
                    out = pipe(
                        num_samples=args.num_samples,
                        class_labels=label,
                        num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(0),
                        output_type="latent",
                        scheduler=scheduler,
                    )
                row["latent_rms"] = float(out.latents.pow(2).mean().sqrt())
                row["texts"] = pipe.decode(out.latents[:2], num_beams=1)
            except Exception as err:  # noqa: BLE001 - the point is to record which ones fail
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(json.dumps(row)[:300], flush=True)
    payload = {
        "benchmark": "scheduler_support",
        "command": "python benchmarks/scheduler_support.py " + " ".join(sys.argv[1:]),
        "pipeline": args.pipeline,
        "class": label,
        "num_samples": args.num_samples,
        "results": rows,
    }
    common.write_results("", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
