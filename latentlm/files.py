"""Files written so that a reader never sees half of them: a folder or a JSON file appears whole, in one
rename, or not at all (checkpoints, final models, latent caches, the history files ``--resume`` reads);
the leftovers of a killed write are removed; and model folders are read only when they hold no pickled
weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "read_json",
    "remove_leftovers",
    "refuse_pickled_weights",
    "write_json_atomic",
    "PICKLE_SUFFIXES",
]

#: weight files that are Python pickles: loading one can run code, so latentlm never reads them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A run killed half-way through writing leaves only a ``.tmp-*`` folder behind, never a
    half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a synced temporary sibling and one rename: a reader (``--resume``)
    sees the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(obj, indent=2, ensure_ascii=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_leftovers(final: str | Path) -> None:
    """Remove the ``.tmp-*`` / ``.old-*`` siblings that a killed `atomic_directory` write of ``final`` left."""
    final = Path(final)
    for prefix in (".tmp", ".old"):
        for leftover in final.parent.glob(f"{prefix}-{final.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def refuse_pickled_weights(folder: str | Path) -> None:
    """Raise if ``folder`` (searched recursively) holds a pickled weight file: latentlm reads safetensors
    only, and unpickling a file from elsewhere can run code."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    found = sorted(path for path in folder.rglob("*") if path.suffix in PICKLE_SUFFIXES and path.is_file())
    if found:
        raise ValueError(
            f"{str(found[0])!r} is a pickled weight file; latentlm loads safetensors only and never unpickles "
            f"(loading a pickle can run code). Remove {'it' if len(found) == 1 else f'these {len(found)} files'} "
            "or convert the weights to safetensors."
        )


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a damaged file is a ValueError that names it (not a bare JSONDecodeError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({err}); restore the file or save the model again."
        ) from None
