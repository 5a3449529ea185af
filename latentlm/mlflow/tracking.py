"""MLflow tracking that never stops training.

``Tracker`` owns one MLflow run (optionally nested under a parent ``Tracker``) and talks to MLflow
through ``MlflowClient`` with explicit run ids, so a parent run and its per-stage children can be
open at once. When the tracking server cannot be reached, training goes on: the tracker warns once,
keeps every call in order in a queue, retries it later, and at the end writes whatever is still
unsent to ``<fallback_dir>/mlflow_unsent.jsonl``, so no metric is lost; the next tracker of the
same run name there sends them first and removes them from the file (`latentlm train --resume` opens
one for every finished stage with calls waiting, so they reach the stage's own run).

Run ids are kept in ``<fallback_dir>/mlflow_runs.json``: a resumed training run (``resume=True``)
continues the same MLflow run instead of opening a new one, and a fresh start marks a run that
never logged its end as KILLED rather than leaving it RUNNING.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latentlm.config import TrackingConfig

logger = logging.getLogger(__name__)

# MLflow's HTTP client retries for minutes by default; a training loop should notice an unreachable
# server in seconds and carry on. Users who set these themselves keep their values.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_LENGTH = 6000
_RETRY_INTERVAL_S = 30.0


def flatten_dict(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_dict(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _rejected(error: Exception) -> bool:
    """MLflow answered that the call itself is invalid (a bad name or value), not that it is unreachable."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code == "INVALID_PARAMETER_VALUE"


class Tracker:
    """One MLflow run. Use as a context manager; ``active=False`` (e.g. non-main processes) logs nothing."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str | None = None,
        parent: Tracker | None = None,
        fallback_dir: str | Path | None = None,
        active: bool = True,
        resume: bool = False,
    ):
        self.cfg = cfg
        self.run_name = run_name or cfg.run_name
        self.parent = parent
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self.active = active and cfg.enabled
        self.resume = resume
        self.run_id: str | None = None
        self._client = None
        self._started = False
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._last_attempt = 0.0
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        """Picklable, for a stage run in its own process: the MLflow client is left behind (a copy
        serves as a nested run's ``parent``, which needs only its name and run id)."""
        return {**self.__dict__, "_client": None}

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="FAILED" if exc_type is not None else "FINISHED")

    @property
    def tracking_uri(self) -> str:
        import mlflow

        return self.cfg.tracking_uri or mlflow.get_tracking_uri()

    def start(self) -> None:
        if not self.active:
            return
        for key, value in _FAST_FAIL_ENV.items():
            os.environ.setdefault(key, value)
        self._started = True
        # Creating the client can fail too (a store MLflow refuses, a server that is down): that goes
        # through the same queue as every other call instead of stopping training.
        self._submit("_create_run", {})
        for op, kwargs in self._take_unsent():
            self._submit(op, kwargs)

    def close(self, status: str = "FINISHED") -> None:
        if not self.active or not self._started:
            return
        self._submit("_terminate", {"status": status})
        self._flush(force=True)
        if self._pending:
            self._write_unsent()
        self._started = False
        self._client = None

    # -- logging API -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_dict(params)
        items = []
        for key, value in flat.items():
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            if len(text) > _MAX_PARAM_LENGTH:
                warnings.warn(
                    f"MLflow param {key!r} is {len(text)} characters, over MLflow's {_MAX_PARAM_LENGTH}; it is "
                    "logged shortened, and the full value is in the config artifact.",
                    stacklevel=2,
                )
                text = text[: _MAX_PARAM_LENGTH - 20] + "...[shortened]"
            items.append((key, text))
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._submit("_log_params", {"params": items[start : start + 100]})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._submit("_log_metrics", {"metrics": values, "step": int(step), "timestamp": int(time.time() * 1000)})

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A list of row dicts as an MLflow table (viewable in the UI's artifact tab)."""
        columns: dict[str, list[Any]] = {}
        for row in rows:
            for key in row:
                columns.setdefault(key, [])
        for row in rows:
            for key in columns:
                columns[key].append(row.get(key))
        self._submit("_log_table", {"data": columns, "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("_log_text", {"text": text, "artifact_file": artifact_file})

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self._submit("_log_dict", {"dictionary": dict(dictionary), "artifact_file": artifact_file})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole folder (the folder's contents go under ``artifact_path``)."""
        self._submit("_log_artifact", {"local_path": str(local_path), "artifact_path": artifact_path})

    # -- plumbing --------------------------------------------------------------------------------
    def _submit(self, op: str, kwargs: dict[str, Any]) -> None:
        if not self.active or not self._started:
            return
        self._pending.append((op, kwargs))
        self._flush(force=len(self._pending) == 1)

    def _flush(self, force: bool = False) -> None:
        if not self._pending:
            return
        if not force and time.monotonic() - self._last_attempt < _RETRY_INTERVAL_S:
            return
        self._last_attempt = time.monotonic()
        while self._pending:
            op, kwargs = self._pending[0]
            try:
                getattr(self, op)(**kwargs)
            except Exception as error:  # noqa: BLE001 - any tracking failure must not stop training
                if self.run_id is not None and _rejected(error):
                    # MLflow refused this one call (say, a metric name with '+'): retrying cannot help,
                    # and it must not hold back the calls behind it. Keep it on disk instead.
                    self._pending.pop(0)
                    self._write_unsent([(op, {**kwargs, "error": str(error)})])
                    continue
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"MLflow tracking at {self.tracking_uri!r} failed ({type(error).__name__}: {error}). "
                        "Training goes on; tracking calls are kept and retried every "
                        f"{int(_RETRY_INTERVAL_S)} s, and anything still unsent at the end is written to disk.",
                        stacklevel=3,
                    )
                return
            self._pending.pop(0)
            if self._warned and not self._pending:
                logger.warning("MLflow tracking at %s reachable again; all queued calls were sent.", self.tracking_uri)

    def _write_unsent(self, calls: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        """Append calls MLflow did not take to ``<fallback_dir>/mlflow_unsent.jsonl`` (default: the queue)."""
        rejected = calls is not None
        calls = calls if rejected else self._pending
        folder = self.fallback_dir or Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "mlflow_unsent.jsonl"
        with open(path, "a") as handle:
            for op, kwargs in calls:
                handle.write(
                    json.dumps({"run_name": self.run_name, "op": op.lstrip("_"), **kwargs}, default=str) + "\n"
                )
        if rejected:
            warnings.warn(
                f"MLflow refused a {calls[0][0].lstrip('_')} call ({calls[0][1]['error'][:300]}); it was written to "
                f"{str(path)!r} and tracking goes on.",
                stacklevel=4,
            )
            return
        warnings.warn(
            f"MLflow tracking at {self.tracking_uri!r} stayed unreachable: {len(calls)} calls "
            f"(metrics, params, artifacts) were written to {str(path)!r} instead.",
            stacklevel=3,
        )
        self._pending.clear()

    # -- continuity across restarts ---------------------------------------------------------------
    @property
    def _registry_key(self) -> str:
        return f"{self.parent.run_name}/{self.run_name}" if self.parent is not None else str(self.run_name)

    def _registry_path(self) -> Path:
        return (self.fallback_dir or Path.cwd()) / "mlflow_runs.json"

    def _registry(self) -> dict[str, Any]:
        path = self._registry_path()
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s is unreadable; a new MLflow run is opened.", path)
            return {}

    def _remember(self) -> None:
        from latentlm.files import write_json_atomic

        registry = self._registry()
        registry[self._registry_key] = {"run_id": self.run_id, "tracking_uri": self.tracking_uri}
        write_json_atomic(self._registry_path(), registry)

    @staticmethod
    def unsent_run_names(fallback_dir: str | Path) -> set[str]:
        """The run names with calls waiting in ``<fallback_dir>/mlflow_unsent.jsonl`` (refused ones aside):
        a run whose stage is finished opens a tracker for them only so that they reach it."""
        path = Path(fallback_dir) / "mlflow_unsent.jsonl"
        if not path.is_file():
            return set()
        names = set()
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                if "error" not in entry and entry.get("op") not in ("create_run", "terminate"):
                    names.add(entry.get("run_name"))
        return names

    def _take_unsent(self) -> list[tuple[str, dict[str, Any]]]:
        """Calls of this run name left in ``mlflow_unsent.jsonl`` by an earlier process (refused ones stay)."""
        path = (self.fallback_dir or Path.cwd()) / "mlflow_unsent.jsonl"
        if not path.is_file():
            return []
        mine, rest = [], []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.get("op") in ("create_run", "terminate") and entry.get("run_name") == self.run_name:
                continue  # the earlier process's run lifecycle; this tracker has its own
            if entry.get("run_name") == self.run_name and "error" not in entry:
                op = "_" + entry.pop("op")
                entry.pop("run_name")
                mine.append((op, entry))
            else:
                rest.append(line)
        if mine:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in rest))
            os.replace(tmp, path)
            if not rest:
                path.unlink()
            logger.warning(
                "Replaying %d MLflow calls of %r queued by an earlier run in %s.", len(mine), self.run_name, path
            )
        return mine

    def _create_run(self) -> None:
        if self.run_id is not None:
            return
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        earlier = self._registry().get(self._registry_key)
        if earlier and earlier.get("tracking_uri") == self.tracking_uri:
            try:
                run = self._client.get_run(earlier["run_id"])
            except Exception:  # noqa: BLE001 - deleted or from another store: open a new run
                run = None
            if run is not None and self.resume:
                self._client.update_run(run.info.run_id, status="RUNNING")
                self.run_id = run.info.run_id
                return
            if run is not None and run.info.status == "RUNNING":
                # Its process died before logging the end; this fresh start replaces it.
                self._client.set_terminated(run.info.run_id, status="KILLED")
        experiment = self._client.get_experiment_by_name(self.cfg.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(self.cfg.experiment_name)
        )
        tags = {}
        if self.parent is not None:
            if self.parent.run_id is None:
                raise RuntimeError("the parent run has not been created yet")
            tags["mlflow.parentRunId"] = self.parent.run_id
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        if self.fallback_dir is not None:
            self._remember()

    def _terminate(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status)

    def _log_params(self, params: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in params])

    def _log_metrics(self, metrics: dict[str, float], step: int, timestamp: int) -> None:
        from mlflow.entities import Metric

        self._client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp, step) for k, v in metrics.items()])

    def _log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        self._client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def _log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def _log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dictionary, artifact_file)

    def _log_artifact(self, local_path: str, artifact_path: str | None) -> None:
        if Path(local_path).is_dir():
            self._client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self._client.log_artifact(self.run_id, local_path, artifact_path)
