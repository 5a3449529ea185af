"""Load on a pipeline served by `mlflow models serve` (loopback only): N concurrent clients for a
bounded time. Reports requests/s, p50/p99 latency, errors, and whether every response equals the
same request served alone (each request carries its own seed).

    python benchmarks/serving_load.py [PIPELINE_DIR] [--clients 4] [--seconds 20] [--max-requests 400]

Without PIPELINE_DIR a tiny untrained pipeline is built (speed of the serving path, not of a model).
Writes benchmarks/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import sampling_common as common

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(url: str, seed: int, steps: int, timeout: float = 300) -> tuple[int, object]:
    body = json.dumps(
        {"dataframe_records": [{"num_samples": 2}], "params": {"seed": seed, "num_inference_steps": steps}}
    ).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[:300]
    except OSError as err:
        return 0, str(err)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", nargs="?", default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=400)
    parser.add_argument("--steps", type=int, default=4, help="inference steps per request")
    parser.add_argument("--distinct-seeds", type=int, default=8, help="requests cycle through this many seeds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentlm.mlflow_model import save_pipeline_model

    work = Path(tempfile.mkdtemp(prefix="serving_load_"))
    if args.pipeline is None:
        pipeline = common.build_tiny_pipeline(work / "pipeline", common.tiny_corpus_dir())
        description = "tiny untrained pipeline (benchmarks/sampling_common.build_tiny_pipeline)"
    else:
        pipeline, description = Path(args.pipeline), str(args.pipeline)
    save_pipeline_model(pipeline, work / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            str(work / "model"),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model server did not start:\n{(work / 'serve.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        # The reference: every distinct request served alone.
        alone = {seed: invoke(url, seed, args.steps) for seed in range(args.distinct_seeds)}
        results: list[dict] = []
        lock = threading.Lock()
        counter = iter(range(args.max_requests))
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            while time.monotonic() < stop_at:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                seed = index % args.distinct_seeds
                tick = time.perf_counter()
                status, body = invoke(url, seed, args.steps)
                with lock:
                    results.append(
                        {
                            "seed": seed,
                            "status": status,
                            "latency_s": time.perf_counter() - tick,
                            "same_as_alone": (status, body) == alone[seed],
                        }
                    )

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    latencies = [r["latency_s"] for r in results]
    payload = {
        "benchmark": "serving_load",
        "command": "python benchmarks/serving_load.py " + " ".join(sys.argv[1:]),
        "pipeline": description,
        "clients": args.clients,
        "seconds": args.seconds,
        "steps": args.steps,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": len(results) / wall if wall else None,
        "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
        "errors": sum(r["status"] != 200 for r in results),
        "responses_equal_to_alone": sum(r["same_as_alone"] for r in results),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
    }
    print(json.dumps(payload, indent=1))
    common.write_results("serving_load", payload, args.out)
    return 0 if payload["errors"] == 0 and payload["responses_equal_to_alone"] == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
