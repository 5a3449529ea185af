"""Load on a pipeline served by `mlflow models serve` (loopback only): N concurrent clients for a
bounded time. Reports requests/s, p50/p99 latency, errors, and whether every response equals the
same request served alone (each request carries its own seed). Then the abuse a server must survive:
requests over the served model's limits (each must get HTTP 400 at once, the server staying up), and
a killed worker process (SIGKILL during requests: what the in-flight requests got, and how long until
the server answers again). The memory high-water mark of the server's processes is sampled throughout.

    python benchmarks/serving_load.py [PIPELINE_DIR] [--clients 4] [--seconds 20] [--max-requests 400] [--workers 1]

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

import common

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


def send(url: str, payload: dict, timeout: float = 300) -> tuple[int, float]:
    """POST ``payload`` to /invocations; (HTTP status or 0 for no answer, seconds)."""
    tick = time.perf_counter()
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - tick
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - tick
    except OSError:
        return 0, time.perf_counter() - tick


class MemoryHighWater(threading.Thread):
    """Samples the resident memory of a process and its children every 0.2 s; ``peak_mb`` is the largest sum."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.running = pid, 0.0, True

    def run(self) -> None:
        import psutil

        while self.running:
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_mb = max(self.peak_mb, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)


def over_limit_requests(url: str) -> list[dict]:
    """Requests above `latentlm.mlflow.pyfunc.REQUEST_LIMITS`: each must be refused (400) quickly."""
    cases = {
        "1,000,000 samples": {"dataframe_records": [{"num_samples": 1000000}], "params": {"num_inference_steps": 2}},
        "3,000 samples x 1,000 steps": {
            "dataframe_records": [{"num_samples": 3000}],
            "params": {"num_inference_steps": 1000},
        },
    }
    out = []
    for name, payload in cases.items():
        status, seconds = send(url, payload, timeout=120)
        out.append({"request": name, "status": status, "seconds": round(seconds, 3)})
    return out


def kill_a_worker(url: str, server_pid: int, steps: int, in_flight: int = 4, recover_s: float = 180) -> dict:
    """SIGKILL the server's worker process while ``in_flight`` requests run; what they got, and how long
    until a request succeeds again."""
    import psutil

    workers = psutil.Process(server_pid).children(recursive=True)
    if not workers:
        return {"killed": None, "note": "the server has no worker process to kill"}
    # the largest process holds the pipeline: the one worker, or one of several under uvicorn's supervisor
    victim = max(workers, key=lambda p: p.memory_info().rss)
    described = " ".join(victim.cmdline()[:6])
    payload = {"dataframe_records": [{"num_samples": 2}], "params": {"num_inference_steps": steps}}
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(send(url, payload, timeout=120)[0])) for _ in range(in_flight)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    victim.kill()
    killed_at = time.monotonic()
    for thread in threads:
        thread.join()
    recovered_after = None
    while time.monotonic() - killed_at < recover_s:
        if send(url, payload, timeout=60)[0] == 200:
            recovered_after = round(time.monotonic() - killed_at, 1)
            break
        time.sleep(1)
    return {
        "killed": described,
        "in_flight_statuses": sorted(statuses),
        "requests_held": sum(s == 200 for s in statuses),
        "seconds_until_a_request_succeeds_again": recovered_after,
        "server_still_running": psutil.pid_exists(server_pid),
    }


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
    parser.add_argument("--workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentlm.mlflow.pyfunc import save_pipeline_model

    work = Path(tempfile.mkdtemp(prefix="serving_load_"))
    if args.pipeline is None:
        pipeline = common.build_tiny_pipeline(work / "pipeline", common.tiny_corpus_dir())
        description = "tiny untrained pipeline (benchmarks/common.build_tiny_pipeline)"
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
            str(args.workers),
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
        memory = MemoryHighWater(server.pid)
        memory.start()
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
        over_limit = over_limit_requests(url)
        alive_after_over_limit = invoke(url, 0, args.steps)[0] == 200
        worker_kill = kill_a_worker(url, server.pid, args.steps)
        memory.running = False
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    latencies = [r["latency_s"] for r in results]
    payload = {
        "benchmark": "serving_load",
        "command": "python benchmarks/serving_load.py " + " ".join(sys.argv[1:]),
        "pipeline": description,
        "clients": args.clients,
        "workers": args.workers,
        "seconds": args.seconds,
        "steps": args.steps,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": len(results) / wall if wall else None,
        "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
        "errors": sum(r["status"] != 200 for r in results),
        "responses_equal_to_alone": sum(r["same_as_alone"] for r in results),
        "over_limit_requests": over_limit,
        "answers_after_over_limit_requests": alive_after_over_limit,
        "worker_kill": worker_kill,
        "memory_high_water_mb": round(memory.peak_mb, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
    }
    print(json.dumps(payload, indent=1))
    common.write_results("serving_load", payload, args.out)
    held = (
        payload["errors"] == 0
        and payload["responses_equal_to_alone"] == len(results)
        and all(r["status"] == 400 for r in over_limit)
        and alive_after_over_limit
    )
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
