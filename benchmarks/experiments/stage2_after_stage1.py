"""Stage-2 step time in a fresh process against the same stage 2 after other work in one process.

`latentlm train` runs stage 1, the decoder tuning and stage 2 in one process; its stage 2 was seen
to run 1.7 times slower than the same stage 2 started on its own. Each mode runs in a new
interpreter, does its preliminary work, then trains 200 stage-2 steps of the config on the given
autoencoder's latents and reports seconds per step and the process's RSS. Just before stage 2 it
also times two allocator-bound operations (``torch.empty`` of 1 MiB, and ``x * 2`` writing a new
4 MiB tensor) with the page faults they cause, which show what an earlier stage left behind:

- ``fresh``: stage 2 only;
- ``load_decode``: load the autoencoder and decode 8 texts with its language model first;
- ``after_training``: a short stage 1 (40 LoRA steps) and decoder tuning (10 steps) first.

    python benchmarks/stage2_after_stage1.py --config configs/snippets.yaml \
        --autoencoder outputs/snippets-a/autoencoder --data ../shared/data/snippets

Writes benchmarks/results/stage2_after_stage1.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
MODES = ("fresh", "load_decode", "after_training")


def allocation_probe() -> dict:
    """Microseconds per call (and minor page faults per call) of two ops whose cost is the heap's."""
    import resource

    import torch

    x = torch.randn(64, 32, 512)  # 4 MiB, a stage-2 activation
    result = {}
    for name, op, calls in (("empty_1mib", lambda: torch.empty(256 * 1024), 2000), ("mul_4mib", lambda: x * 2.0, 200)):
        for _ in range(50):
            op()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tick = time.perf_counter()
        for _ in range(calls):
            op()
        seconds = time.perf_counter() - tick
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        result[name] = {
            "us_per_call": round(seconds / calls * 1e6, 1),
            "page_faults_per_call": round(faults / calls, 1),
        }
    return result


def run_mode(mode: str, config_path: str, autoencoder: str, data: str, steps: int, out_dir: Path) -> dict:
    """In this (new) process: the mode's preliminary work, then ``steps`` stage-2 steps."""
    import psutil
    import torch

    from latentlm import TextAutoencoder
    from latentlm.config import load_config
    from latentlm.training.stages.autoencoder import train_autoencoder
    from latentlm.training.stages.decoder_tuning import tune_decoder
    from latentlm.training.stages.diffusion import train_diffusion

    sets = [
        f"data.path={data}",
        f"output_dir={out_dir}",
        "tracking.enabled=false",
        "autoencoder.optimizer.max_steps=40",
        "autoencoder.alignment_warmup_steps=0",
        "autoencoder.eval_every=1000",
        "autoencoder.save_every=100000",
        "decoder_tuning.enabled=true",
        "decoder_tuning.optimizer.max_steps=10",
        "decoder_tuning.save_every=100000",
        f"diffusion.optimizer.max_steps={steps}",
        "diffusion.sample_every=0",
        "diffusion.save_every=100000",
        "diffusion.log_every=50",
    ]
    config = load_config(config_path, sets)
    if mode == "load_decode":
        model = TextAutoencoder.from_pretrained(autoencoder).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.decode(model.encode(["The film has a kind of hard, cold effect."] * 8), num_beams=1)
    elif mode == "after_training":
        tune_decoder(config, train_autoencoder(config))
    rss_before = psutil.Process().memory_info().rss / 2**20
    probe = allocation_probe()
    train_diffusion(config, autoencoder)
    history = json.loads((out_dir / "diffusion_history.json").read_text())
    return {
        "mode": mode,
        "steps": history["final_step"],
        "seconds_per_step": round(history["train_time_s"] / history["final_step"], 3),
        "rss_mib_before_stage2": round(rss_before),
        "allocation_probe_before_stage2": probe,
        "loss_curve": [(c["step"], c["train_time_s"]) for c in history["loss_curve"]],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run config (stage 1, tuning and stage 2 settings)")
    parser.add_argument("--autoencoder", required=True, help="the trained autoencoder folder stage 2 runs on")
    parser.add_argument("--data", required=True, help="data.path for the config")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage2_after_stage1.json"))
    parser.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # internal: run in a child process
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one_mode:
        row = run_mode(args.one_mode, args.config, args.autoencoder, args.data, args.steps, Path(args.work_dir))
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            tick = time.perf_counter()
            child = [sys.executable, __file__, "--config", args.config, "--autoencoder", args.autoencoder]
            child += ["--data", args.data, "--steps", str(args.steps), "--one-mode", mode]
            child += ["--work-dir", str(Path(tmp) / mode)]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
            row["wall_s"] = round(time.perf_counter() - tick, 1)
            rows.append(row)
            probe = row["allocation_probe_before_stage2"]
            print(
                f"{mode:<15} {row['seconds_per_step']:.3f} s/step  RSS {row['rss_mib_before_stage2']} MiB  "
                f"empty(1 MiB) {probe['empty_1mib']['us_per_call']} us  x*2 (4 MiB) {probe['mul_4mib']['us_per_call']} us",
                flush=True,
            )
    result = {
        "benchmark": "stage2_after_stage1",
        "command": "python benchmarks/stage2_after_stage1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
