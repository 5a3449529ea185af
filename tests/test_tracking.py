"""Tracker: a tracking store MLflow refuses must not stop training, and nothing is lost."""

import json
import warnings

from latentlm.config import TrackingConfig
from latentlm.mlflow.tracking import Tracker


def test_a_refused_tracking_store_is_reported_and_its_calls_written_to_disk(tmp_path):
    cfg = TrackingConfig(tracking_uri="unknown-scheme://nowhere", experiment_name="e")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(cfg, run_name="r", fallback_dir=tmp_path) as tracker:
            tracker.log_params({"a": {"b": 1}})
            tracker.log_metrics({"loss": 0.5}, step=3)
    messages = " ".join(str(w.message) for w in caught)
    assert "Training goes on" in messages and "mlflow_unsent.jsonl" in messages
    rows = [json.loads(line) for line in (tmp_path / "mlflow_unsent.jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["create_run", "log_params", "log_metrics", "terminate"]
    assert rows[1]["params"] == [["a.b", "1"]]
    assert rows[2]["metrics"] == {"loss": 0.5} and rows[2]["step"] == 3


def test_a_call_mlflow_refuses_is_kept_on_disk_and_does_not_hold_back_the_rest(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="e")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(cfg, run_name="r", fallback_dir=tmp_path) as tracker:
            tracker.log_metrics({"dpm++_25/mauve": 0.9}, step=0)  # '+' is not allowed in MLflow names
            tracker.log_metrics({"loss": 0.5}, step=1)
    assert any("MLflow refused a log_metrics call" in str(w.message) for w in caught)
    rows = [json.loads(line) for line in (tmp_path / "mlflow_unsent.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["metrics"] == {"dpm++_25/mauve": 0.9} and "error" in rows[0]
    run = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 0.5} and run.info.status == "FINISHED"


def test_resume_continues_the_same_mlflow_run_and_a_fresh_start_ends_a_dead_one(tmp_path):
    from mlflow import MlflowClient

    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="e")
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    killed = Tracker(cfg, run_name="train", fallback_dir=tmp_path)
    killed.start()
    killed.log_params({"lr": 0.1})
    killed.log_metrics({"loss": 2.0}, step=1)  # ... and the process dies here: no close()
    assert client.get_run(killed.run_id).info.status == "RUNNING"

    with Tracker(cfg, run_name="train", fallback_dir=tmp_path, resume=True) as resumed:
        resumed.log_metrics({"loss": 1.0}, step=2)
    assert resumed.run_id == killed.run_id
    run = client.get_run(killed.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [m.value for m in client.get_metric_history(killed.run_id, "loss")] == [2.0, 1.0]

    dead = Tracker(cfg, run_name="train", fallback_dir=tmp_path)
    dead.start()  # killed again, then started afresh without --resume
    with Tracker(cfg, run_name="train", fallback_dir=tmp_path) as fresh:
        pass
    assert fresh.run_id != dead.run_id
    assert client.get_run(dead.run_id).info.status == "KILLED"


def test_calls_written_to_disk_are_replayed_by_the_next_start(tmp_path):
    from mlflow import MlflowClient

    down = TrackingConfig(tracking_uri="unknown-scheme://nowhere", experiment_name="e")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Tracker(down, run_name="train", fallback_dir=tmp_path) as tracker:
            tracker.log_metrics({"loss": 0.5}, step=3)
            tracker.log_params({"lr": 0.1})
    unsent = tmp_path / "mlflow_unsent.jsonl"
    assert unsent.is_file()
    up = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="e")
    with Tracker(up, run_name="train", fallback_dir=tmp_path, resume=True) as tracker:
        pass
    run = MlflowClient(tracking_uri=up.tracking_uri).get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 0.5} and run.data.params == {"lr": "0.1"}
    assert run.info.status == "FINISHED"
    assert not unsent.exists()
