"""The class labels of a dataset: the training examples with their labels, and labels as class ids."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from latentlm.config import DataConfig
from latentlm.data.loading import load_text_dataset

logger = logging.getLogger(__name__)

__all__ = ["load_training_examples", "resolve_class_labels", "warn_unseen_validation_classes"]


def resolve_class_labels(
    raw_labels: Sequence[Any] | None, class_names: Sequence[str] | None = None
) -> tuple[list[int] | None, list[str]]:
    """Dataset labels -> (class ids, class names).

    Without ``class_names`` the classes are the distinct labels, sorted (numbers numerically).
    With ``class_names`` every label must be one of them, else a ValueError lists the strays.
    """
    if raw_labels is None:
        if class_names:
            raise ValueError(
                f"diffusion.denoiser.class_names={list(class_names)} but the data have no labels: set "
                "data.label_column to the column holding them (or drop class_names for an unconditional model)."
            )
        return None, []
    missing = [i for i, label in enumerate(raw_labels) if label is None or (isinstance(label, str) and not label)]
    if missing:
        raise ValueError(f"{len(missing)} training examples have no label (first rows: {missing[:5]}).")
    as_str = [str(label) for label in raw_labels]
    if len(set(as_str)) < 2 and (class_names is None or len(set(class_names)) < 2):
        raise ValueError(
            f"Every training example has the label {as_str[0]!r}: a class-conditional model needs at least two "
            "classes to tell apart. Set data.label_column to a column with several classes, or to null for an "
            "unconditional model."
        )
    if class_names is None:
        distinct = set(raw_labels)
        ordered = sorted(distinct, key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
        class_names = [str(v) for v in ordered]
    class_names = [str(name) for name in class_names]
    index = {name: i for i, name in enumerate(class_names)}
    strays = sorted({label for label in as_str if label not in index})
    if strays:
        raise ValueError(
            f"Labels {strays[:10]} are not in the class list {class_names}. Fix the data or set "
            "diffusion.denoiser.class_names to include them."
        )
    return [index[label] for label in as_str], class_names


def load_training_examples(data: DataConfig) -> tuple[list[str], list[Any] | None, list[str] | None]:
    """The training split's texts, labels (None without ``data.label_column``) and sources (None without
    ``data.source_column``)."""
    ds = load_text_dataset(data, data.train_split, data.max_train_samples)
    texts = list(ds[data.text_column])
    labels = list(ds[data.label_column]) if data.label_column else None
    sources = list(ds[data.source_column]) if data.source_column else None
    return texts, labels, sources


def warn_unseen_validation_classes(data: DataConfig, class_names: list[str]) -> None:
    """Warn when the validation split holds labels the model has no class for: it cannot sample them."""
    if not (class_names and data.label_column and data.validation_split):
        return
    try:
        ds = load_text_dataset(data, data.validation_split, data.max_eval_samples)
    except (ValueError, FileNotFoundError):
        return  # no usable validation split: stage 2 does not need one
    unseen = sorted({str(label) for label in ds[data.label_column]} - set(class_names))
    if unseen:
        logger.warning(
            "The validation split has labels %s that no training example has; the model knows only %s and cannot "
            "sample them.",
            unseen[:10],
            class_names,
        )
