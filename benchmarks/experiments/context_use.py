"""Does a segment pipeline's denoiser read the story so far, at each noise level?

`latentlm.evaluation.long_text.context_use` at several noise levels t/T on the validation stories. Its
errors read against ``latent_variance`` (the error of predicting every sentence as the mean sentence):
``1 - none / latent_variance`` is what the noisy latents alone tell the denoiser, and ``gain`` what the
story adds on top.

    python benchmarks/experiments/context_use.py --run outputs/roc-ctx --data ../shared/data/rocstories \
        --noise-levels 0.5 0.8 0.9 0.95 1.0 --threads 2 --out benchmarks/results/context_use_avx2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a `latentlm train` run with data.segments")
    parser.add_argument("--data", required=True, help="folder with validation.jsonl of stories")
    parser.add_argument("--num-stories", type=int, default=250)
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 1.0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "context_use.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentlm.evaluation.long_text import context_use
    from latentlm.sampling import load_pipeline

    lines = (Path(args.data) / "validation.jsonl").read_text().splitlines()
    stories = [json.loads(line)["text"] for line in lines if line][: args.num_stories]
    pipe = load_pipeline(Path(args.run) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    levels = []
    for level in args.noise_levels:
        use = context_use(pipe, stories, noise_level=level, batch_size=args.batch_size, seed=args.seed)
        use["none_over_variance"] = use["none"] / use["latent_variance"]
        levels.append(use)
        print(json.dumps(use), flush=True)
    result = {"run": args.run, "num_stories": len(stories), "levels": levels, "seconds": time.perf_counter() - start}
    common.write_results("", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
