"""Shared pieces of the benchmarks (not a benchmark itself): arguments, thread set-up, the machine
a figure was measured on, timing, and the JSON every benchmark writes (`write_results`).

Every benchmark takes a pipeline folder (the quickstart pipeline is the realistic one); without one
it builds a tiny, untrained pipeline over a word-level tokenizer and a small BART trained on
nothing, on the quickstart restaurant grammar (``latentlm.data.restaurants``), so the scripts run anywhere in
seconds. Untrained models write nonsense: their speed figures are about the code path and the
model sizes, not about quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from latentlm.pipelines import make_scheduler  # noqa: F401 - the benchmarks call common.make_scheduler

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# PNGs, per-sample dumps and MLflow bookkeeping: git-ignored, outside benchmarks/results.
OUTPUTS_DIR = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks"
FAST_DECODE = dict(num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0)


# ---------------------------------------------------------------------------------------- CLI


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "pipeline",
        nargs="?",
        default=None,
        help="pipeline folder (save_pretrained output); default: build a tiny untrained one",
    )
    parser.add_argument(
        "--build",
        default="tiny",
        choices=["tiny", "minilm"],
        help="without PIPELINE_DIR: a tiny pipeline, or one at real sizes over the offline MiniLM "
        "BERT2BERT (32 x 64 latents; untrained, for speed only)",
    )
    parser.add_argument(
        "--denoiser-size",
        default="base",
        choices=["tiny", "small", "base"],
        help="denoiser of the --build minilm pipeline (LD4LG: base)",
    )
    parser.add_argument("--quick", action="store_true", help="a reduced grid that runs in a couple of minutes")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/<name>.json)")
    return parser


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------- pipeline


def tiny_corpus_dir() -> Path:
    """train.jsonl / validation.jsonl of the quickstart restaurant grammar, in a temp folder."""
    from latentlm.data.restaurants import write_corpus

    folder = Path(tempfile.mkdtemp(prefix="latentlm-bench-corpus-"))
    return write_corpus(folder, num_train=2000, num_validation=300, seed=0)


def build_tiny_pipeline(folder: Path, corpus_dir: Path) -> Path:
    """Save an untrained tiny pipeline over the corpus' texts and food classes (`latentlm.testing`)."""
    from latentlm.data.restaurants import FOODS
    from latentlm.testing import build_tiny_pipeline as build

    texts = [json.loads(line)["text"] for line in (corpus_dir / "train.jsonl").read_text().splitlines()]
    return build(folder, texts, list(FOODS))


def build_minilm_pipeline(folder: Path, denoiser_size: str = "base") -> Path:
    """Save an untrained pipeline at LD4LG sizes over the offline MiniLM BERT2BERT backbone:
    32 x 64 latents, 3 + 3 Perceiver/reconstruction layers, a ``denoiser_size`` denoiser."""
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder
    from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
    from latentlm.pipelines import LatentTextDiffusionPipeline

    from latentlm.data.restaurants import FOODS

    torch.manual_seed(0)
    text_autoencoder = TextAutoencoder.from_backbone("minilm", num_latents=32, latent_dim=64, max_length=64)
    denoiser = LatentDenoiser.from_size(
        denoiser_size, num_latents=32, latent_dim=64, num_classes=len(FOODS), class_names=list(FOODS)
    )
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.02)
    pipe = LatentTextDiffusionPipeline(
        tokenizer=text_autoencoder.tokenizer,
        language_model=text_autoencoder.merged_language_model(),
        autoencoder=text_autoencoder.autoencoder,
        denoiser=denoiser.eval(),
        scheduler=make_noise_scheduler(),
        max_length=64,
    )
    pipe.save_pretrained(folder)
    return folder


def load_pipeline(pipeline_dir: str | None, device: torch.device, build: str = "tiny", denoiser_size: str = "base"):
    """(pipeline, folder, description) -- the given folder, or a freshly built untrained one."""
    from latentlm.pipelines import LatentTextDiffusionPipeline

    if pipeline_dir is None and build == "minilm":
        folder = build_minilm_pipeline(Path(tempfile.mkdtemp(prefix="latentlm-bench-pipe-")), denoiser_size)
        description = f"untrained MiniLM BERT2BERT pipeline, 32x64 latents, {denoiser_size} denoiser"
    elif pipeline_dir is None:
        folder = build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="latentlm-bench-pipe-")), tiny_corpus_dir())
        description = "tiny untrained pipeline (benchmarks/common.py)"
    else:
        folder, description = Path(pipeline_dir), str(pipeline_dir)
    pipe = LatentTextDiffusionPipeline.from_pretrained(str(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder, description


def model_sizes(pipe) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("language_model", "autoencoder", "denoiser")
    }


# ---------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated, or on CPU the peak resident set size
    above the level at entry (sampled every 5 ms from /proc, so short spikes can be missed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._peak = self._base
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_bytes = self._peak - self._base


# ---------------------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    """What a figure was measured on: the CPU, its cores, whether it multiplies bf16 natively (the fast
    path of `mixed_precision: auto`) and torch's threads."""
    from latentlm.hardware import has_native_bf16

    native = has_native_bf16("cpu")
    vector = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", ... (what torch's kernels use)
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_kind": f"{vector}-BF16" if native else f"{vector} (no native bf16)",
        "native_bf16": native,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def write_results(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """Write a benchmark's figures as JSON (atomically) to ``out`` or ``benchmarks/results/<name>.json``,
    with the command that made them and the machine, where the payload does not say them already."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("command", " ".join(["python", *sys.argv]))
    payload.setdefault("machine", machine())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def metric_key(name: str) -> str:
    """MLflow metric names allow only [A-Za-z0-9_-. :/]: "dpm++_25/latency_s" -> "dpmpp_25/latency_s"."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("+", "p"))


def log_to_mlflow(
    args, name: str, params: dict, metrics: list[tuple[dict[str, float], int]], artifacts: list[Path]
) -> str | None:
    """One MLflow run per benchmark: params, metrics (with steps), plots and the JSON as artifacts."""
    if args.no_mlflow:
        return None
    from latentlm.config import TrackingConfig
    from latentlm.mlflow.tracking import Tracker

    cfg = TrackingConfig(experiment_name="latentlm-benchmarks", tracking_uri=args.tracking_uri, run_name=name)
    with Tracker(cfg, run_name=name, fallback_dir=OUTPUTS_DIR) as tracker:
        tracker.log_params(params)
        for values, step in metrics:
            tracker.log_metrics({metric_key(k): v for k, v in values.items()}, step=step)
        for path in artifacts:
            tracker.log_artifact(path)
    print(f"logged to MLflow run {tracker.run_id} ({tracker.tracking_uri})")
    return tracker.run_id


def plot(path: Path, panels: list[dict[str, Any]], title: str) -> Path | None:
    """Line plots side by side. A panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "logx"}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'latentlm[eval]'): no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o", label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if len(panel["series"]) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
