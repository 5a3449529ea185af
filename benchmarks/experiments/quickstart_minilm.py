"""Can the offline MiniLM backbone do the quickstart within budget? A short, timed stage-1 run.

Trains stage 1 of configs/quickstart_minilm.yaml (all-MiniLM-L6-v2 as BERT2BERT, LoRA decoder)
for a few steps on the quickstart corpus and reports seconds per step (wall and process CPU),
reconstruction BLEU / exact match at the end, and the projected stage-1 time for the config's
max_steps, next to the same numbers for configs/quickstart.yaml's scratch BART.

    python benchmarks/quickstart_minilm.py --steps 100

Writes benchmarks/results/quickstart_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_stage1(config_path: Path, output_dir: Path, steps: int, eval_samples: int) -> dict:
    from latentlm.config import load_config
    from latentlm.training.run import prepare_data
    from latentlm.training.stages.autoencoder import train_autoencoder
    from latentlm.training.stages.backbone import prepare_backbone

    config = load_config(
        config_path,
        [
            f"output_dir={output_dir}",
            f"autoencoder.optimizer.max_steps={steps}",
            "autoencoder.eval_every=0",
            "autoencoder.save_every=100000",
            f"data.max_eval_samples={eval_samples}",
            "tracking.enabled=false",
        ],
    )
    config = prepare_data(config)
    tick, cpu = time.perf_counter(), cpu_seconds()
    config = prepare_backbone(config)
    backbone_wall, backbone_cpu = time.perf_counter() - tick, cpu_seconds() - cpu
    tick, cpu = time.perf_counter(), cpu_seconds()
    train_autoencoder(config)
    wall, cpu = time.perf_counter() - tick, cpu_seconds() - cpu
    history = json.loads((output_dir / "autoencoder_history.json").read_text())
    last = history["history"][-1] if history["history"] else {}
    train_time = history["train_time_s"]
    return {
        "backbone": load_config(config_path).autoencoder.model.backbone,
        "steps": steps,
        "batch_size": config.autoencoder.optimizer.batch_size,
        "backbone_pretrain_wall_s": round(backbone_wall, 1),
        "backbone_pretrain_cpu_s": round(backbone_cpu, 1),
        "stage1_wall_s_incl_setup_and_eval": round(wall, 1),
        "stage1_cpu_s_incl_setup_and_eval": round(cpu, 1),
        "train_step_wall_s": round(train_time / steps, 3),
        "bleu": last.get("bleu"),
        "exact_match": last.get("exact_match"),
        "config_max_steps": load_config(config_path).autoencoder.optimizer.max_steps,
        "projected_stage1_train_wall_s": round(
            train_time / steps * load_config(config_path).autoencoder.optimizer.max_steps, 1
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-scratch", action="store_true", help="only measure MiniLM")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench-quickstart-minilm"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart_minilm.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "runs": {},
    }
    workdir = Path(args.workdir)
    report["runs"]["minilm"] = run_stage1(
        ROOT / "configs" / "quickstart_minilm.yaml", workdir / "minilm", args.steps, args.eval_samples
    )
    if not args.skip_scratch:
        report["runs"]["scratch_bart"] = run_stage1(
            ROOT / "configs" / "quickstart.yaml", workdir / "scratch", args.steps, args.eval_samples
        )
    report["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
