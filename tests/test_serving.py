"""`mlflow models serve` answers POST /invocations for a logged pipeline: concurrent requests equal the
same requests alone, and bad requests get HTTP 400 with a message naming the problem. Loopback only."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_tracking_server import free_port, server_env, stop_server, wait_healthy

SERVER_START_TIMEOUT_S = 180


def start_model_server(model_dir: Path, port: int, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / "serve.log", "w")
    # limits of this deployment (latentlm.mlflow.pyfunc.REQUEST_LIMITS), low enough to test cheaply
    env = server_env(HF_HUB_OFFLINE="1", LATENTLM_SERVE_MAX_SAMPLES="8", LATENTLM_SERVE_MAX_SAMPLE_STEPS="100")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            str(model_dir),
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
        cwd=log_dir,
        start_new_session=True,
        env=env,
    )


def invoke(url: str, records: list[dict], params: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    body = json.dumps({"dataframe_records": records, "params": params or {}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    from conftest import make_tiny_text_autoencoder
    from test_pipeline import make_pipeline

    from latentlm.mlflow.pyfunc import save_pipeline_model

    root = tmp_path_factory.mktemp("serving")
    from conftest import _save, build_tiny_bart, build_tokenizer, seed_everything

    seed_everything(0)
    tokenizer = build_tokenizer()
    bart = _save(build_tiny_bart(len(tokenizer)), tokenizer, root / "bart")
    make_pipeline(make_tiny_text_autoencoder(bart)).save_pretrained(root / "pipeline")
    save_pipeline_model(root / "pipeline", root / "model")
    port = free_port()
    process = start_model_server(root / "model", port, root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, SERVER_START_TIMEOUT_S, path="/ping", log=root / "serve.log")
        yield url
    finally:
        stop_server(process)


def test_served_pipeline_answers_concurrent_requests_like_single_ones(served_model):
    requests = [
        (
            [{"class": "even", "num_samples": 2}],
            {"seed": s, "num_inference_steps": 2 + s % 3, "scheduler": ("dpm++", "ddim", "unipc", "euler")[s % 4]},
        )
        for s in range(6)
    ]
    alone = [invoke(served_model, records, params) for records, params in requests]
    assert all(status == 200 for status, _ in alone), alone
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda r: invoke(served_model, *r), requests))
    assert together == alone
    texts = alone[0][1]["predictions"]
    assert [row["class"] for row in texts] == ["even", "even"] and all(isinstance(row["text"], str) for row in texts)


@pytest.mark.parametrize(
    "records,params,message",
    [
        ([{"klass": "even", "num_samples": 1}], {}, "unknown input columns ['klass']"),
        ([{"class": "nope", "num_samples": 1}], {}, "unknown class name 'nope'"),
        ([{"class": "even", "num_samples": 1}], {"scheduler": "heun-ish"}, "Unknown scheduler 'heun-ish'"),
        # one request cannot take the server down: the deployment's limits are named
        (
            [{"class": "even", "num_samples": 1000000}],
            {"num_inference_steps": 2},
            "1000000 texts asked for: over this server's limit max_samples=8 (set by LATENTLM_SERVE_MAX_SAMPLES)",
        ),
        ([{"class": "even", "num_samples": 5}] * 2, {"num_inference_steps": 2}, "max_samples=8"),
        ([{"class": "even", "num_samples": 6}], {"num_inference_steps": 20}, "6 texts x 20 steps: over this server's"),
        ([{"class": "even", "num_samples": 2.7}], {}, "row 0: num_samples=2.7 must be a positive integer"),
        ([{"class": ["even"], "num_samples": 1}], {}, "row 0: class=['even'] must be one class name or id"),
        ([{"num_samples": 1}], {"guidance_scale": 2.0}, "guidance_scale=2 needs a class"),
    ],
)
def test_bad_requests_get_400_with_the_reason(served_model, records, params, message):
    status, body = invoke(served_model, records, params)
    assert status == 400
    assert message in body["message"]


def test_requests_are_checked_before_any_sampling(monkeypatch):
    # Unknown params (which the server's schema may drop before predict) and a bad limit setting.
    import latentlm.mlflow.pyfunc as served

    model = served.PipelinePyfunc.__new__(served.PipelinePyfunc)
    model.limits = served.request_limits()
    with pytest.raises(ValueError, match=r"unknown params \['guidance'\]"):
        model.predict({"class": ["even"]}, params={"guidance": 2.0})
    with pytest.raises(ValueError, match="seed=-1 must be an integer"):
        model.predict({"class": ["even"]}, params={"seed": -1})
    monkeypatch.setenv("LATENTLM_SERVE_MAX_SAMPLES", "0")
    with pytest.raises(ValueError, match="LATENTLM_SERVE_MAX_SAMPLES='0' must be a positive integer"):
        served.request_limits()
