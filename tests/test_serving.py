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
    env = server_env(HF_HUB_OFFLINE="1")
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

    from latentlm.mlflow_model import save_pipeline_model

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
    ],
)
def test_bad_requests_get_400_with_the_reason(served_model, records, params, message):
    status, body = invoke(served_model, records, params)
    assert status == 400
    assert message in body["message"]
