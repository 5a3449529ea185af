"""Reading a run config: YAML (or a mapping) merged strictly onto `RunConfig`, with ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from latentlm.config.autoencoder_model import AutoencoderModelConfig, LoraSettings
from latentlm.config.run_config import RunConfig

__all__ = ["load_config", "nest_model_keys"]


#: the flat ``autoencoder:`` keys of earlier releases -> their path under ``autoencoder.model``
FLAT_MODEL_KEYS: dict[str, tuple[str, ...]] = {
    **{f.name: (f.name,) for f in dataclasses.fields(AutoencoderModelConfig) if f.name not in ("lora", "causal")},
    **{f"lora_{f.name}": ("lora", f.name) for f in dataclasses.fields(LoraSettings)},
    "context_layers": ("causal", "context_layers"),
    "prompt_template": ("causal", "prompt_template"),
    "causal_memory": ("causal", "memory"),
}


def nest_model_keys(section: dict[str, Any], where: str = "autoencoder") -> dict[str, Any]:
    """``section`` (a raw ``autoencoder:`` mapping) with the flat model keys of earlier releases moved
    under ``model`` (a flat key replaces the nested one it names, as a ``--set`` override would), and
    a `FutureWarning` that shows the new form. A section without flat keys comes back unchanged."""
    flat = [key for key in section if key in FLAT_MODEL_KEYS]
    if not flat:
        return section
    section = dict(section)
    model = section.get("model") or {}
    if not isinstance(model, dict):
        raise ValueError(f"{where}.model must be a mapping, got {model!r}.")
    model = {key: dict(value) if isinstance(value, dict) else value for key, value in model.items()}
    moved: dict[str, Any] = {}
    for key in flat:
        path = FLAT_MODEL_KEYS[key]
        node, node_moved = model, moved
        for part in path[:-1]:
            node = node.setdefault(part, {})
            node_moved = node_moved.setdefault(part, {})
        node[path[-1]] = node_moved[path[-1]] = section.pop(key)
    section["model"] = model
    warnings.warn(
        f"{', '.join(f'{where}.{key}' for key in flat)}: model settings now live under {where}.model, and the "
        "flat keys will stop loading in a future release. Write them as:\n"
        + yaml.safe_dump({where.split(".")[-1]: {"model": moved}}, sort_keys=False),
        FutureWarning,
        stacklevel=3,
    )
    return section


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML scalar to the field's type (YAML 1.1 reads ``1e-4`` as a string, for instance)."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = [a for a in args if a is not type(None)]
        return _coerce(value, options[0], where) if len(options) == 1 else value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where} must be true or false, got {value!r}.")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}.") from None
        if annotation is int:
            if number != int(number):
                raise ValueError(f"{where} must be a whole number, got {value!r}.")
            return int(number)
        return number
    if annotation is str and isinstance(value, bool):
        # YAML 1.1 reads a bare `no` / `yes` as a boolean: `mixed_precision: no` means "no".
        return "yes" if value else "no"
    if annotation is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}.")
    if origin is list and not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {value!r}.")
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}.")
    return value


def _merge(instance: Any, values: Mapping[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``instance`` with ``values`` applied, recursively, strictly."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(type(instance))
    names = {f.name for f in dataclasses.fields(instance)}
    updates = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"Unknown config key {path!r}. Valid keys here: {sorted(names)}.")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value or {}, path)
        else:
            updates[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(instance, **updates)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"Override {override!r} must look like section.key=value.")
    dotted, value = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"Override {override!r}: {key!r} is not a section.")
    node[keys[-1]] = yaml.safe_load(value)


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML file (or a mapping), apply ``section.key=value`` overrides, validate, return a RunConfig."""
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"Config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}.")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, so overrides never touch the caller's mapping
    for override in overrides:
        _apply_override(raw, override)
    if isinstance(raw.get("autoencoder"), Mapping):
        raw["autoencoder"] = nest_model_keys(raw["autoencoder"])
    config = _merge(RunConfig(), raw, "")
    config.validate()
    return config
