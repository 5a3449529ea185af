"""MLflow against a real `mlflow server` on 127.0.0.1, and an unreachable one (nothing may be lost)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from latentlm.config import TrackingConfig
from latentlm.mlflow.tracking import Tracker

SERVER_START_TIMEOUT_S = 180


def server_env(**extra: str) -> dict[str, str]:
    """The environment for an mlflow server process: this interpreter's scripts (uvicorn, which mlflow
    starts by name) first on PATH, so the tests pass without an activated virtual environment."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, process: subprocess.Popen, timeout_s: float, path: str = "/health", log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    tail = lambda: "" if log is None else "\n" + log.read_text()[-3000:]  # noqa: E731
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server at {url} exited with {process.returncode}{tail()}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server at {url} not healthy after {timeout_s} s{tail()}")


def start_server(root: Path, port: int) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,
        env=server_env(),
    )


def stop_server(process: subprocess.Popen) -> None:
    # Only the server we started (its own session: uvicorn/gunicorn children go with it).
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    process = start_server(root, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, SERVER_START_TIMEOUT_S)
        yield url
    finally:
        stop_server(process)


def test_nested_runs_metrics_and_pyfunc_through_a_server(mlflow_server, tmp_path, tiny_text_autoencoder):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from test_pipeline import make_pipeline

    from latentlm.mlflow.pyfunc import log_pipeline_model

    make_pipeline(tiny_text_autoencoder).save_pretrained(tmp_path / "pipeline")
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment_name="server-test")
    with Tracker(cfg, run_name="parent", fallback_dir=tmp_path) as parent:
        parent.log_params({"model": {"size": "tiny"}})
        with Tracker(cfg, run_name="stage", parent=parent, fallback_dir=tmp_path) as child:
            for step in range(1, 6):
                child.log_metrics({"train/loss": 1.0 / step}, step)
        log_pipeline_model(parent, tmp_path / "pipeline")
    assert not (tmp_path / "mlflow_unsent.jsonl").exists()

    client = MlflowClient(mlflow_server)
    run = client.get_run(parent.run_id)
    assert run.data.params["model.size"] == "tiny" and run.info.status == "FINISHED"
    stage = client.get_run(child.run_id)
    assert stage.data.tags["mlflow.parentRunId"] == parent.run_id
    history = client.get_metric_history(child.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 6)]

    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{parent.run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    params = {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_interval": [0.5, 1.0]}
    result = model.predict(pd.DataFrame({"class": ["even"], "num_samples": [2]}), params=params)
    assert result["class"].tolist() == ["even", "even"]
    with pytest.raises(Exception, match="guidance_interval must be"):
        model.predict(pd.DataFrame({"class": ["even"]}), params={**params, "guidance_interval": [0.9, 0.1]})


def test_unreachable_server_buffers_and_nothing_is_lost(tmp_path):
    """Logging while the server is down goes on (one warning); once it is up, everything arrives."""
    from mlflow import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = TrackingConfig(tracking_uri=url, experiment_name="flaky")
    tracker = Tracker(cfg, run_name="flaky-run", fallback_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start()
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.log_params({"lr": 0.1})
    messages = [str(w.message) for w in caught if "MLflow tracking" in str(w.message)]
    assert len(messages) == 1 and "Training goes on" in messages[0]  # says so, once
    assert tracker.run_id is None  # nothing reached a server yet

    process = start_server(tmp_path / "server", port)
    try:
        wait_healthy(url, process, SERVER_START_TIMEOUT_S)
        tracker.log_metrics({"train/loss": 4.0}, 4)
        tracker.close()
        client = MlflowClient(url)
        run = client.get_run(tracker.run_id)
        history = sorted(client.get_metric_history(tracker.run_id, "train/loss"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"
    finally:
        stop_server(process)
    assert not (tmp_path / "mlflow_unsent.jsonl").exists()


def test_training_goes_on_when_the_server_never_comes(tmp_path, tiny_bart_dir):
    """End-to-end `train` against a dead server: it finishes, warns, and writes every call to disk."""
    from conftest import SENTENCES
    from test_cli import tiny_config

    from latentlm.config import load_config
    from latentlm.training.run import train

    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", SENTENCES[:16]), ("validation", SENTENCES[16:20])):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": "a" if i % 2 else "b"}) + "\n" for i, t in enumerate(rows))
        )
    raw = tiny_config(tmp_path / "run", data, tiny_bart_dir, f"http://127.0.0.1:{free_port()}")
    raw["diffusion"]["num_samples_per_class"] = 1
    with pytest.warns(UserWarning, match="Training goes on"):
        pipeline = train(load_config(raw))
    assert (pipeline / "model_index.json").is_file()
    unsent = [json.loads(line) for line in (tmp_path / "run" / "mlflow_unsent.jsonl").read_text().splitlines()]
    diffusion_steps = sorted(
        entry["step"]
        for entry in unsent
        if entry["op"] == "log_metrics" and entry["run_name"] == "diffusion" and "train/loss" in entry["metrics"]
    )
    assert diffusion_steps == [1, 2, 3, 4]
    assert any(entry["op"] == "log_artifact" and entry["artifact_path"] == "model" for entry in unsent)


def test_default_local_store(tmp_path, monkeypatch):
    """tracking_uri unset and no MLFLOW_TRACKING_URI: MLflow's default local store in the working directory."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    cfg = TrackingConfig(experiment_name="local")
    with Tracker(cfg, run_name="local-run", fallback_dir=tmp_path) as tracker:
        tracker.log_metrics({"x": 1.5}, 3)
    uri = tracker.tracking_uri
    assert uri.startswith("sqlite:") or uri.startswith("file:") or "mlruns" in uri
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "x")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]
    assert not (tmp_path / "mlflow_unsent.jsonl").exists()
