"""Which precision a run trains in (``run.precision``).

``auto`` means bf16 autocast on GPUs and, on CPUs, bf16 only where it was
measured to pay: ConvNets on CPUs with native bf16 instructions (AVX-512 BF16
or AMX). There the narrow CIFAR ResNet ran ~2x faster than fp32 (110 -> 220
img/s on 2 cores, channels-last) and trained as well (bench/results/train.md).
ViTs on CPU stay fp32 under ``auto``: not measured.
"""
from __future__ import annotations

import functools

from .backbone import is_vit_name

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags list AVX-512 BF16 or AMX-BF16 (Linux; False where unknown)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _BF16_FLAGS)
    except OSError:
        pass
    return False


def use_bf16(precision: str, device_type: str, model_name: str, cpu_bf16: bool | None = None) -> bool:
    """Whether to autocast to bf16: ``precision`` is ``run.precision``, ``device_type`` "cuda" or "cpu",
    ``cpu_bf16`` overrides the CPU flag check (tests)."""
    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        return True
    native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    return native and not is_vit_name(model_name)


__all__ = ["cpu_has_native_bf16", "use_bf16"]
