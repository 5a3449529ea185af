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

from latentlm.pipelines.sampling_options import SamplingOptions, make_scheduler

__all__ = [
    "PipelinePyfunc",
    "save_pipeline_model",
    "log_pipeline_model",
    "request_limits",
    "MODEL_ARTIFACT_PATH",
    "PARAM_DEFAULTS",
    "REQUEST_LIMITS",
]

MODEL_ARTIFACT_PATH = "model"
LOCAL_MODEL_DIR = "mlflow_model"
#: The request parameters: `SamplingOptions`'s served fields (``{name: (MLflow type, default)}``) and the seed.
PARAM_TYPES: dict[str, tuple[str, Any]] = {**SamplingOptions.served_fields(), "seed": ("long", 0)}
PARAM_DEFAULTS: dict[str, Any] = {name: default for name, (_, default) in PARAM_TYPES.items()}
#: What one request may ask of a served model, so that no request can take the server down (memory
#: grows with the samples, time with samples x steps). A deployment sets its own through these
#: environment variables of the serving process; a request above one is refused (HTTP 400).
REQUEST_LIMITS: dict[str, tuple[str, int]] = {
    "max_samples": ("LATENTLM_SERVE_MAX_SAMPLES", 256),  # texts in one request, over all rows
    "max_sample_steps": ("LATENTLM_SERVE_MAX_SAMPLE_STEPS", 256 * 50),  # texts x num_inference_steps
    "max_source_chars": ("LATENTLM_SERVE_MAX_SOURCE_CHARS", 4000),  # characters of one source text
}


def request_limits() -> dict[str, int]:
    """`REQUEST_LIMITS` as this process's environment sets them."""
    import os

    limits = {}
    for name, (variable, default) in REQUEST_LIMITS.items():
        raw = os.environ.get(variable)
        try:
            limits[name] = default if raw is None else int(raw)
        except ValueError as err:
            raise ValueError(f"{variable}={raw!r} must be a positive integer.") from err
        if limits[name] < 1:
            raise ValueError(f"{variable}={raw!r} must be a positive integer.")
    return limits


class InvalidRequestError(MlflowException, ValueError):
    """Bad model input: a ValueError for Python callers, HTTP 400 with this message from MLflow's server."""


class PipelinePyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(DataFrame, params) -> DataFrame``."""

    def __init__(self, pipeline_dir: str | Path):
        from latentlm.sampling import load_pipeline

        self.limits = request_limits()
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

        from latentlm.sampling import sample_texts

        unknown_params = sorted(set(params or {}) - set(PARAM_DEFAULTS))
        if unknown_params:
            raise ValueError(f"unknown params {unknown_params}; use {sorted(PARAM_DEFAULTS)}.")
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
        requests = [
            self._read_row(index, record, with_sources) for index, record in enumerate(model_input.to_dict("records"))
        ]
        seed = params.pop("seed")
        options = SamplingOptions(**params)
        self._check_limits(requests, options.num_inference_steps)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - len(requests):
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2**63 - number of rows).")
        rows = []
        guidance = options.guidance_scale
        if guidance != 1.0 and any(label is None and source is None for label, _, source in requests):
            raise ValueError(
                f"guidance_scale={guidance:g} needs a class (or a source) in every row: classifier-free guidance "
                "steers towards one; leave guidance_scale at 1 for unconditional rows."
            )
        # A scheduler for this request only: concurrent requests never touch shared state.
        options = options.replace(scheduler=make_scheduler(self.pipe.scheduler, options.scheduler))
        for index, (label, count, source) in enumerate(requests):
            # One pipeline call per input row, seeded with seed + row.
            texts = sample_texts(
                self.pipe,
                count,
                class_name=label,
                seed=seed + index,
                batch_size=max(count, 1),
                source_texts=None if source is None else [source],
                options=options,
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

    @staticmethod
    def _read_row(index: int, record: dict, with_sources: bool) -> tuple[Any, int, str | None]:
        """One input row -> (class or None, num_samples, source or None), each value checked."""
        import pandas as pd

        def missing(value) -> bool:
            return value is None or (isinstance(value, float) and pd.isna(value))

        label = record.get("class")
        if missing(label):
            label = None
        elif isinstance(label, float) and label.is_integer():
            label = int(label)
        elif not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ValueError(f"row {index}: class={label!r} must be one class name or id (or missing).")
        count = record.get("num_samples", 1)
        if missing(count):
            count = 1
        elif isinstance(count, float) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"row {index}: num_samples={count!r} must be a positive integer.")
        source = record.get("source") if with_sources else None
        if missing(source):
            source = None
        elif not isinstance(source, str):
            raise ValueError(f"row {index}: source={source!r} must be a text.")
        return label, count, source

    def _check_limits(self, requests: list[tuple[Any, int, str | None]], num_inference_steps: int) -> None:
        limits, total = self.limits, sum(count for _, count, _ in requests)
        checks = [
            ("max_samples", total, f"{total} texts asked for"),
            ("max_sample_steps", total * num_inference_steps, f"{total} texts x {num_inference_steps} steps"),
            *(
                ("max_source_chars", len(source), f"a source of {len(source)} characters")
                for _, _, source in requests
                if source is not None
            ),
        ]
        for name, value, what in checks:
            if value > limits[name]:
                variable = REQUEST_LIMITS[name][0]
                raise ValueError(
                    f"{what}: over this server's limit {name}={limits[name]} (set by {variable}); send a smaller "
                    "request, or raise the limit where the model is served."
                )


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
                ParamSpec(name, dtype, default, shape=(-1,) if isinstance(default, list) else None)
                for name, (dtype, default) in PARAM_TYPES.items()
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
        loader_module="latentlm.mlflow.pyfunc",
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
