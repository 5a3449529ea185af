"""What the machine computes fast: whether a device multiplies bfloat16 matrices in hardware."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["CPUINFO", "has_native_bf16"]

#: where Linux lists the CPU's features (read by `has_native_bf16` on Arm)
CPUINFO = Path("/proc/cpuinfo")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, so bf16 autocast is faster than fp32.

    A CUDA GPU that supports bf16; a CPU with AVX512-BF16 or AMX (x86) or the BF16 extension (Arm,
    read from ``/proc/cpuinfo``). Elsewhere PyTorch emulates bf16 products, far slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            features = CPUINFO.read_text()
        except OSError:
            return False
        return any(line.startswith("Features") and "bf16" in line.split() for line in features.splitlines())
    return False
