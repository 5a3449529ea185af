"""What a call of `LatentTextDiffusionPipeline` conditions on, checked once per call: class labels
(names or ids) and the source texts of a text-to-text pipeline, how many texts the call returns, and
the error when that many do not fit in memory."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from latentlm.autoencoder.text_codec import check_texts

__all__ = [
    "SourceStates",
    "check_call_arguments",
    "class_label_id",
    "class_label_ids",
    "check_source_texts",
    "check_sources",
    "count_outputs",
    "refuse_out_of_memory",
]


def class_label_id(class_names: list[str], label) -> int:
    """One class label -> its id: a class name, an id, or a string of digits that is not a class name
    (read as an id). The one place class labels are resolved (the pipeline, `latentlm.sample`,
    `latentlm.evaluate` and the MLflow model all call it)."""
    names = list(class_names)
    if not names:
        raise ValueError(
            f"class_labels={label!r} given, but the denoiser is unconditional (num_classes=0): "
            "sample without class_labels."
        )
    if isinstance(label, str):
        if label in names:
            return names.index(label)
        if not label.lstrip("-").isdigit():
            raise ValueError(f"unknown class name {label!r}; this model knows {names}.")
        label = int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < len(names):
            raise ValueError(f"class id {label} is out of range: use 0..{len(names) - 1} ({names}).")
        return int(label)
    raise ValueError(f"class label {label!r} must be a class name (str) or an id (int).")


def class_label_ids(class_names: list[str], class_labels, num_samples: int) -> torch.Tensor | None:
    """Class names / ids -> ``LongTensor [num_samples]`` (or ``None`` for unconditional)."""
    if class_labels is None:
        return None
    if not class_names:
        class_label_id(class_names, class_labels)  # the unconditional model's error
    if torch.is_tensor(class_labels):
        class_labels = class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (str, int, np.integer)):
        class_labels = [class_labels] * num_samples
    if not isinstance(class_labels, (list, tuple)):
        raise ValueError(f"class_labels={class_labels!r}: give a class name (str), an id (int), or a list of them.")
    class_labels = list(class_labels)
    if len(class_labels) != num_samples:
        raise ValueError(
            f"got {len(class_labels)} class labels for num_samples={num_samples}: pass one label, "
            "or exactly num_samples labels."
        )
    return torch.tensor([class_label_id(class_names, label) for label in class_labels], dtype=torch.long)


@dataclass
class SourceStates:
    """Source states made outside the call, e.g. the latent context of a long text's next segment
    (`latent_context_states`): ``states [B, L, cross_attention_dim]`` and ``mask [B, L]`` (1 = read).
    A row whose mask is all zero reads no source (the null context)."""

    states: torch.Tensor
    mask: torch.Tensor
    #: the call returns its texts grouped per source, as for source_texts (False: one text per row)
    per_source: bool = True

    def __post_init__(self):
        if self.states.ndim != 3 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(
                f"source states must be [batch, length, width] with a mask [batch, length]; got "
                f"{tuple(self.states.shape)} and {tuple(self.mask.shape)}."
            )

    def __len__(self) -> int:
        return self.states.shape[0]

    def repeated(self, repeats: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) on ``device``, each row repeated ``repeats`` times in a row."""
        states = self.states.to(device=device, dtype=dtype).repeat_interleave(repeats, dim=0)
        return states, self.mask.to(device).repeat_interleave(repeats, dim=0)


def check_sources(
    source_texts, source_states: SourceStates | None, cross_attention_dim: int | None
) -> list[str] | SourceStates | None:
    """The call's sources: texts (checked by `check_source_texts`) or states made outside the call
    (whose width must be the denoiser's); not both."""
    if source_states is None:
        return check_source_texts(source_texts, cross_attention_dim)
    if source_texts is not None:
        raise ValueError("Give source_texts or source_states, not both.")
    if not isinstance(source_states, SourceStates):
        raise TypeError(f"source_states must be a SourceStates(states, mask), got {type(source_states).__name__}.")
    if source_states.states.shape[2] != cross_attention_dim:
        raise ValueError(
            f"source_states have width {source_states.states.shape[2]}, but the denoiser reads sources of width "
            f"{cross_attention_dim}."
        )
    return source_states


def check_source_texts(source_texts, cross_attention_dim: int | None) -> list[str] | None:
    """The call's sources as a list of non-empty strings (None for a call without sources); a source
    given to a model trained without one, or the reverse, is an error."""
    if source_texts is None:
        if cross_attention_dim is not None:
            raise ValueError(
                "This pipeline generates from a source text (its denoiser was trained with data.source_column): "
                "pass source_texts=[...], e.g. pipe(source_texts=['name[The Eagle], food[Italian]'])."
            )
        return None
    if cross_attention_dim is None:
        raise ValueError(
            "source_texts given, but this pipeline's denoiser was trained without a source (cross_attention_dim "
            "is None): sample it without source_texts, or train a text-to-text model (data.source_column)."
        )
    if isinstance(source_texts, str):
        source_texts = [source_texts]
    return check_texts(source_texts, "source_texts")


def count_outputs(sources, num_samples, num_samples_per_source, mbr_candidates, output_type) -> int:
    """The number of texts a call returns; checks the text-to-text arguments and that MBR has texts to
    compare (the options themselves are checked by `SamplingOptions`)."""
    if (
        not isinstance(num_samples_per_source, int)
        or isinstance(num_samples_per_source, bool)
        or num_samples_per_source < 1
    ):
        raise ValueError(f"num_samples_per_source must be a positive integer, got {num_samples_per_source!r}.")
    if mbr_candidates > 1 and output_type != "text":
        raise ValueError("MBR decoding compares decoded texts: use output_type='text' with mbr_candidates > 1.")
    if sources is None:
        if num_samples_per_source != 1:
            raise ValueError("num_samples_per_source needs source_texts; without sources use num_samples.")
        return 1 if num_samples is None else num_samples
    if num_samples is not None:
        raise ValueError(
            f"num_samples={num_samples!r} with sources: the batch is len(source_texts) x "
            "num_samples_per_source; set num_samples_per_source instead."
        )
    return len(sources) * num_samples_per_source


def check_call_arguments(num_samples, output_type, callback_on_step_end_tensor_inputs, allowed_tensor_inputs) -> None:
    """The plain arguments of a pipeline call: the count, the output type and the callback's tensors."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if output_type not in ("text", "latent"):
        raise ValueError(f"output_type={output_type!r}: use 'text' or 'latent'.")
    for name in callback_on_step_end_tensor_inputs:
        if name not in allowed_tensor_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs has {name!r}; allowed: {allowed_tensor_inputs}.")


@contextlib.contextmanager
def refuse_out_of_memory(batch: int):
    """An allocation that fails inside a call becomes an error that says what to do; the pipeline holds
    no state of the call, so it stays usable."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError):
            if "can't allocate memory" not in str(err) and "out of memory" not in str(err):
                raise
        raise MemoryError(
            f"A batch of {batch} samples does not fit in memory ({type(err).__name__}: {str(err)[:200]}). Sample "
            "fewer at a time: a smaller num_samples (or batch_size in latentlm.sample / sample_texts)."
        ) from err
