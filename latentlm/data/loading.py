"""Text datasets through `datasets`: a hub name, or local jsonl/json/csv/txt/parquet files.

`DataConfig.path` may be
- a file (``texts.jsonl``): it is the ``train`` split; take a validation split out of it with
  datasets' slicing syntax, e.g. ``train_split: "train[:-500]"``, ``validation_split: "train[-500:]"``;
- a folder with ``train.jsonl`` / ``validation.jsonl`` (or csv/parquet/txt; datasets' file-name rules);
- a hub dataset name (needs network access).

`read_texts` reads the texts (and labels) of one local file for evaluation and benchmarks.

Every loaded split is validated: it exists, is non-empty, has the text column, and holds no empty
or non-string texts. Nothing is silently dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from latentlm.config import DataConfig

__all__ = ["load_text_dataset", "load_texts", "read_texts", "find_label_column", "count_truncated", "FILE_BUILDERS"]

logger = logging.getLogger(__name__)

# file extension -> datasets packaged builder
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def check_text_file(path: Path) -> None:
    """Fail with the file name (and line) on what would otherwise surface as an anonymous error deep
    inside datasets/pyarrow: an empty file, bytes that are not UTF-8, a line of jsonl that is not JSON."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"Data file {str(path)!r} is empty: there is nothing to train or evaluate on.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"Data file {str(path)!r} is not UTF-8 (line {line}, byte {err.start}: {data[err.start : err.start + 1]!r}). "
            f"Convert it, e.g. iconv -f latin1 -t utf-8."
        ) from None
    if path.suffix.lower() == ".jsonl":
        import json

        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r}, line {number}: not valid JSON ({err.msg}): {line[:80]!r}.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r}, line {number}: expected a JSON object per line, got {line[:80]!r}.")
            for key, value in row.items():
                if isinstance(value, str):
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError as err:
                        raise ValueError(
                            f"{str(path)!r}, line {number}: {key!r} holds a lone surrogate {value[err.start]!r} at "
                            f"character {err.start} (half of a UTF-16 pair: no text can hold it). Fix or remove it."
                        ) from None


def _load_split(path: str, split: str) -> datasets.Dataset:
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"Unsupported data file {str(local)!r}: use one of {', '.join(sorted(FILE_BUILDERS))}."
                )
            if builder != "parquet":
                check_text_file(local)
            return datasets.load_dataset(builder, data_files={"train": str(local)}, split=split)
        if local.is_dir():
            for file in sorted(local.iterdir()):
                if file.is_file() and FILE_BUILDERS.get(file.suffix.lower()) in ("json", "csv", "text"):
                    check_text_file(file)
            return datasets.load_dataset(str(local), split=split)
        if local.suffix.lower() in FILE_BUILDERS or str(path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Data path {path!r} does not exist.")
        return datasets.load_dataset(path, split=split)
    except ValueError as err:
        if "corresponds to no data" in str(err):
            raise ValueError(
                f"Split {split!r} of {path!r} is empty: there is nothing to train or evaluate on."
            ) from err
        if "split" in str(err).lower() or "Unknown" in str(err):
            raise ValueError(
                f"Split {split!r} is not available in {path!r} ({err}). Set data.train_split / "
                f"data.validation_split to existing splits (a single file is the 'train' split; slice it like "
                f"'train[:-500]' and 'train[-500:]')."
            ) from err
        raise


def load_text_dataset(data_cfg: DataConfig, split: str, max_samples: int | None = None) -> datasets.Dataset:
    """Load one split and validate it (see module docstring); keeps the first `max_samples` rows."""
    if not data_cfg.path:
        raise ValueError("data.path is empty: give a dataset name, a data file, or a folder of split files.")
    if not split:
        raise ValueError("The split name is empty; set data.train_split / data.validation_split.")
    ds = _load_split(str(data_cfg.path), split)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max samples must be positive, got {max_samples}.")
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"Split {split!r} of {data_cfg.path!r} is empty: there is nothing to train or evaluate on.")
    column = data_cfg.text_column
    if column not in ds.column_names:
        raise ValueError(
            f"Text column {column!r} not found in split {split!r} of {data_cfg.path!r}; available columns: "
            f"{ds.column_names}. Set data.text_column."
        )
    if data_cfg.segments:
        ds = _segment_dataset(ds, data_cfg)
    for key in ("label_column", "source_column"):
        name = getattr(data_cfg, key)
        if name is not None and name not in ds.column_names:
            raise ValueError(
                f"{key.replace('_', ' ').capitalize()} {name!r} not found in split {split!r} of {data_cfg.path!r}; "
                f"available columns: {ds.column_names}. Set data.{key} (or null)."
            )
    for name in (column, data_cfg.source_column):
        if name is None:
            continue
        bad = [i for i, text in enumerate(ds[name]) if not isinstance(text, str) or not text.strip()]
        if bad:
            raise ValueError(
                f"Split {split!r} of {data_cfg.path!r} has {len(bad)} empty or non-string texts in column {name!r} "
                f"(first rows: {bad[:5]}). Remove or fill them; nothing is skipped silently."
            )
    return ds


def _segment_dataset(ds: datasets.Dataset, data_cfg: DataConfig) -> datasets.Dataset:
    """Documents -> one row per segment: the segment as the text, its context in ``context``, where it
    stands in ``document`` / ``position`` / ``with_right`` (whether the context shows the text after it),
    and the labels and other columns carried over from the document."""
    from latentlm.data.segments import segment_examples

    documents = ds[data_cfg.text_column]
    examples = segment_examples(documents)
    made = ("context", "document", "position", "with_right")
    carried = [c for c in ds.column_names if c != data_cfg.text_column and c not in made]
    rows = {c: [ds[c][e["document"]] for e in examples] for c in carried}
    rows[data_cfg.text_column] = [e["segment"] for e in examples]
    rows.update({key: [e[key] for e in examples] for key in ("context", "document", "position", "with_right")})
    return datasets.Dataset.from_dict(rows)


def load_texts(data_cfg: DataConfig, split: str, max_samples: int | None = None) -> list[str]:
    """The validated texts of one split."""
    return list(load_text_dataset(data_cfg, split, max_samples)[data_cfg.text_column])


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """How many texts have more than `max_length` tokens (special tokens included)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return sum(length > max_length for length in lengths)


def read_texts(
    path: str | Path, text_column: str = "text", label_column: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Texts (and labels) from a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``.txt`` file
    with one text per line; rows with an empty text are left out, with a warning that counts them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a jsonl/json/csv/parquet/txt file of texts.")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use one of {sorted(FILE_BUILDERS)}.")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    if builder == "text":
        text_column = "text"
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{path} has no column {text_column!r}; its columns are {dataset.column_names}. Pass text_column=."
        )
    texts = [str(t) for t in dataset[text_column] if t is not None and str(t).strip()]
    if len(texts) < len(dataset):
        logger.warning(
            "%s: %d of %d rows have an empty %r and are left out.",
            path,
            len(dataset) - len(texts),
            len(dataset),
            text_column,
        )
    if not texts:
        raise ValueError(f"{path} holds no non-empty text in column {text_column!r}.")
    labels = None
    if label_column is not None:
        if label_column not in dataset.column_names:
            raise ValueError(f"{path} has no label column {label_column!r}; its columns are {dataset.column_names}.")
        rows = [
            (str(t), str(label))
            for t, label in zip(dataset[text_column], dataset[label_column])
            if t is not None and str(t).strip()
        ]
        texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    return texts, labels


def find_label_column(path: str | Path, text_column: str, class_names) -> str:
    """The one column of ``path`` whose values include all of ``class_names`` (e.g. ``sentiment``)."""
    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    matches = []
    for column in dataset.column_names:
        if column == text_column:
            continue
        values = {str(v) for v in dataset[column]}
        if set(class_names) <= values:
            matches.append(column)
    if len(matches) != 1:
        raise ValueError(
            f"Cannot tell which column of {path} holds the class labels {list(class_names)} "
            f"(candidates: {matches or 'none'}); pass label_column=."
        )
    return matches[0]
