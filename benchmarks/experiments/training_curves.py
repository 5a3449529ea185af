"""Plot the loss curves of a logged training run (and its child runs, e.g. the two stages of
`latentlm train`) as a PNG, and log the PNG back to that run.

    python benchmarks/training_curves.py RUN_ID [--tracking-uri URI] [--metrics train/loss eval/bleu]
    python benchmarks/training_curves.py --latest [--experiment latentlm]

Writes outputs/benchmarks/training_curves_<run>.png and .json (the plotted points): per-run
plots, not kept in git. ``--out PATH --window N`` also writes the curves' means over windows of N steps
(with the command) to PATH, e.g. a summary under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common  # noqa: E402


def window_means(steps: list[int], values: list[float], window: int) -> list[dict]:
    """Mean of the values logged in each window of ``window`` steps (first step of the window, mean)."""
    windows: dict[int, list[float]] = {}
    for step, value in zip(steps, values):
        windows.setdefault(step // window * window, []).append(value)
    return [{"from_step": start, "mean": sum(vs) / len(vs), "max": max(vs)} for start, vs in sorted(windows.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", nargs="?", default=None)
    parser.add_argument("--latest", action="store_true", help="the latest top-level run of --experiment")
    parser.add_argument("--experiment", default="latentlm")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metric names to plot (default: every metric whose name contains 'loss')",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the PNG back to the run")
    parser.add_argument("--out", default=None, help="also write window means of the curves here")
    parser.add_argument("--window", type=int, default=250, help="steps per window mean (with --out)")
    args = parser.parse_args()
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    if args.run_id is None:
        if not args.latest:
            parser.error("give a RUN_ID or --latest")
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            sys.exit(f"no MLflow experiment {args.experiment!r} at {client.tracking_uri}")
        runs = [
            r
            for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags
        ]
        if not runs:
            sys.exit(f"experiment {args.experiment!r} has no run")
        args.run_id = runs[0].info.run_id
    run = client.get_run(args.run_id)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{args.run_id}'")
    panels, points = [], {}
    for r in [run, *children]:
        name = r.info.run_name or r.info.run_id[:8]
        wanted = args.metrics or [m for m in r.data.metrics if "loss" in m]
        for metric in sorted(m for m in wanted if m in r.data.metrics):
            history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
            xs, ys = [m.step for m in history], [m.value for m in history]
            points[f"{name}/{metric}"] = {"steps": xs, "values": ys}
            panels.append(
                {
                    "title": f"{name}: {metric}",
                    "xlabel": "step",
                    "ylabel": metric,
                    "series": {metric: (xs, ys)},
                    "logy": "loss" in metric and min(ys) > 0,
                }
            )
    if not panels:
        sys.exit(f"run {args.run_id} (and its children) logged none of the metrics {args.metrics or 'containing loss'}")
    name = f"training_curves_{args.run_id[:8]}"
    path = common.write_results(
        name, {"run_id": args.run_id, "curves": points}, str(common.OUTPUTS_DIR / f"{name}.json")
    )
    if args.out:
        summary = {name: window_means(curve["steps"], curve["values"], args.window) for name, curve in points.items()}
        command = "python benchmarks/training_curves.py " + " ".join(sys.argv[1:])
        payload = {"command": command, "run_id": args.run_id, "window": args.window, "window_means": summary}
        common.write_results("training_curves", payload, args.out)
    png = common.plot(path.with_suffix(".png"), panels, f"training curves of run {run.info.run_name or args.run_id}")
    if png is not None and not args.no_mlflow:
        client.log_artifact(args.run_id, str(png), "plots")
        print(f"logged {png.name} to run {args.run_id}")


if __name__ == "__main__":
    main()
