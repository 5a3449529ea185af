"""Hardware set-up of a training stage: which precision this machine computes fast (bf16 where it is
native), the accelerate `Accelerator`, and the attention kernel of a CPU step."""

from __future__ import annotations

import contextlib
import logging

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from latentlm.hardware import has_native_bf16

logger = logging.getLogger(__name__)

__all__ = ["has_native_bf16", "resolve_mixed_precision", "make_accelerator", "attention_kernel"]


def resolve_mixed_precision(mixed_precision: str, device: torch.device | str) -> str:
    """accelerate's precision (``"no"``, ``"bf16"``, ``"fp16"``) for a stage's ``mixed_precision``.

    ``"auto"`` is bf16 where ``device`` computes it natively (`has_native_bf16`), fp16 on a CUDA GPU
    without bf16, and fp32 (``"no"``) otherwise. An explicit ``"bf16"`` without native support is
    kept, with a warning: emulated bf16 products can be tens of times slower than fp32.
    """
    device = torch.device(device)
    if mixed_precision == "auto":
        if has_native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "no"
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a GPU; on CPU use 'auto', 'bf16' or 'no'.")
    if mixed_precision == "bf16" and not has_native_bf16(device):
        logger.warning(
            "mixed_precision='bf16' on a %s without native bfloat16 (on a CPU: no AVX512-BF16 or AMX): "
            "PyTorch emulates bf16 matrix products there, many times slower than fp32 (benchmarks/README.md, "
            "'Mixed precision on CPU'). Set mixed_precision to 'auto' (bf16 only where it is native) or 'no'.",
            device.type.upper() if device.type != "cpu" else "CPU",
        )
    return mixed_precision


def make_accelerator(mixed_precision: str = "no", seed: int = 0) -> Accelerator:
    """One CPU, one GPU or several processes (``accelerate launch``); bf16 autocast works on CPU too.

    ``mixed_precision`` may be ``"auto"`` (see `resolve_mixed_precision`); the accelerator's
    ``mixed_precision`` is then the precision chosen for this machine.
    """
    # Without cpu=True accelerate ignores the torchrun environment on a machine with no accelerator, so
    # `accelerate launch --multi_gpu --num_processes 2` would start 2 independent single-process runs
    # instead of one gloo (MULTI_CPU) run.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    # `latentlm train` runs both stages in one process, each with its own mixed_precision; accelerate
    # keeps one global AcceleratorState and refuses a second setting. Reset that part only: the
    # process group (PartialState) of a multi-process launch stays as it is.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator)
    set_seed(seed)  # same initial weights in every process
    return accelerator


def attention_kernel(device: torch.device):
    """Context for a training step: on CPU, SDPA's math kernel instead of the flash kernel, which is
    slower for short padded text batches (`benchmarks/autoencoder_step_time.py`); elsewhere PyTorch's
    own choice stands."""
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
