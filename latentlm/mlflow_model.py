"""The pipeline as an MLflow pyfunc model: a DataFrame of class / num_samples (/ source) in, texts out.

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("runs:/<run_id>/model")       # or a local model folder
model.predict(pd.DataFrame({"class": ["Italian", "French"], "num_samples": [2, 1]}),
              params={"guidance_scale": 2.0, "num_inference_steps": 25})
#      class                                   text  row
# 0  Italian  Zizzi is an Italian pub in the ...      0
```
A text-to-text pipeline takes a ``source`` column: ``num_samples`` texts are generated from each row's source.

The model is saved with MLflow's ``loader_module`` workflow: the folder holds the pipeline folder
(safetensors) and the name of this module, whose `_load_pyfunc` rebuilds the pipeline; nothing is
pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = ["PipelinePyfunc", "save_pipeline_model", "log_pipeline_model", "MODEL_ARTIFACT_PATH", "PARAM_DEFAULTS"]

MODEL_ARTIFACT_PATH = "model"
LOCAL_MODEL_DIR = "mlflow_model"
PARAM_DEFAULTS: dict[str, Any] = {
    "guidance_scale": 1.0,
    "guidance_interval": [0.0, 1.0],
    "num_inference_steps": 50,
    "seed": 0,
    "scheduler": "dpm++",
}


class InvalidRequestError(MlflowException, ValueError):
    """Bad model input: a ValueError for Python callers, HTTP 400 with this message from MLflow's server."""


class PipelinePyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(DataFrame, params) -> DataFrame``."""

    def __init__(self, pipeline_dir: str | Path):
        from latentlm.sampling import load_pipeline

        self.pipe = load_pipeline(pipeline_dir)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, model_input, params: dict[str, Any] | None = None):
        """Input columns: ``class`` (name, id or missing/None = unconditional), ``num_samples``
        (default 1), ``source`` (text-to-text pipelines: the text to generate from). Output: one row per
        text with ``class``, ``text``, ``row`` (the input row) and, with sources, ``source``.

        Safe to call from several threads (``mlflow models serve`` does): each request samples with
        its own scheduler and generators. Bad input raises an MLflow INVALID_PARAMETER_VALUE error,
        which the scoring server answers with HTTP 400 and the message."""
        try:
            return self._predict(model_input, params)
        except (ValueError, TypeError) as err:
            raise InvalidRequestError(str(err), error_code=INVALID_PARAMETER_VALUE) from err

    def _predict(self, model_input, params: dict[str, Any] | None):
        import pandas as pd

        from latentlm.sampling import make_scheduler, sample_texts

        params = {**PARAM_DEFAULTS, **(params or {})}
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise TypeError(
                f"model_input must be a pandas DataFrame (columns class, num_samples, source), "
                f"got {type(model_input).__name__}."
            )
        unknown = sorted(set(model_input.columns) - {"class", "num_samples", "source"})
        if unknown:
            raise ValueError(f"unknown input columns {unknown}; use 'class', 'num_samples' and 'source'.")
        with_sources = "source" in model_input.columns
        # A scheduler for this request only: concurrent requests never touch shared state.
        scheduler = make_scheduler(self.pipe, params["scheduler"])
        rows = []
        for index, record in enumerate(model_input.to_dict(orient="records")):
            label = record.get("class")
            if label is not None and not isinstance(label, str) and pd.isna(label):
                label = None
            if isinstance(label, float) and label.is_integer():
                label = int(label)
            count = record.get("num_samples", 1)
            count = 1 if count is None or pd.isna(count) else int(count)
            source = record.get("source") if with_sources else None
            if source is not None and not isinstance(source, str) and pd.isna(source):
                source = None
            # One pipeline call per input row, seeded with seed + row.
            texts = sample_texts(
                self.pipe,
                count,
                class_name=label,
                guidance_scale=float(params["guidance_scale"]) if label is not None or source is not None else 1.0,
                guidance_interval=tuple(params["guidance_interval"]),
                num_inference_steps=int(params["num_inference_steps"]),
                scheduler=scheduler,
                seed=int(params["seed"]) + index,
                batch_size=max(count, 1),
                source_texts=None if source is None else [source],
            )
            rows.extend(
                {
                    "class": row["class"],
                    "text": row["text"],
                    "row": index,
                    **({"source": source} if with_sources else {}),
                }
                for row in texts
            )
        columns = ["class", "text", "row"] + (["source"] if with_sources else [])
        return pd.DataFrame(rows, columns=columns)


def _load_pyfunc(data_path: str) -> PipelinePyfunc:
    """MLflow's loader_module hook: ``data_path`` is the copied pipeline folder."""
    return PipelinePyfunc(data_path)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # No input schema: MLflow would drop a misspelt column before predict() sees it (and sample
    # unconditionally); predict() checks the columns itself and names the bad one.
    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec("string", "class", required=False),
                ColSpec("string", "text"),
                ColSpec("long", "row"),
                ColSpec("string", "source", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("guidance_scale", "double", PARAM_DEFAULTS["guidance_scale"]),
                ParamSpec("guidance_interval", "double", PARAM_DEFAULTS["guidance_interval"], shape=(-1,)),
                ParamSpec("num_inference_steps", "long", PARAM_DEFAULTS["num_inference_steps"]),
                ParamSpec("seed", "long", PARAM_DEFAULTS["seed"]),
                ParamSpec("scheduler", "string", PARAM_DEFAULTS["scheduler"]),
            ]
        ),
    )


def save_pipeline_model(pipeline_dir: str | Path, path: str | Path) -> Path:
    """Write an MLflow pyfunc model folder for a saved pipeline folder (``path`` must not exist)."""
    import mlflow

    from latentlm import __version__

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(pipeline_dir)!r} is not a pipeline folder (no model_index.json).")
    # Explicit requirements: MLflow's inference of them would load the model in a subprocess.
    mlflow.pyfunc.save_model(
        path=str(path),
        loader_module="latentlm.mlflow_model",
        data_path=str(pipeline_dir),
        signature=_signature(),
        pip_requirements=[f"latentlm=={__version__}"],
    )
    return Path(path)


def log_pipeline_model(tracker, pipeline_dir: str | Path, local_dir: str | Path | None = None) -> Path:
    """Save the pyfunc model next to the pipeline and log it to ``tracker``'s run as ``model/``.

    The folder stays on disk (``<pipeline_dir>/../mlflow_model``) whether or not the tracking
    server is reachable; the tracker queues the upload like any other call.
    """
    import shutil

    pipeline_dir = Path(pipeline_dir)
    local_dir = Path(local_dir) if local_dir is not None else pipeline_dir.parent / LOCAL_MODEL_DIR
    if local_dir.exists():
        shutil.rmtree(local_dir)
    save_pipeline_model(pipeline_dir, local_dir)
    tracker.log_artifact(local_dir, MODEL_ARTIFACT_PATH)
    return local_dir
