# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The check every command makes of its `--device` before any work: a device this torch
cannot use is refused in one line, never silently replaced by the CPU."""

from __future__ import annotations

import torch

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["DeviceError", "check_device"]


class DeviceError(Moe2DenseError, ValueError):
    """The device is unknown to torch or not available on this machine."""


def check_device(device: str) -> torch.device:
    """`device` parsed, if this process can run on it; raises DeviceError naming what is missing."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:N, mps, xpu)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU"
            raise DeviceError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}, {build}); use --device cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return parsed
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if parsed.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise DeviceError(f"--device {device}: {parsed.type} is not available in this torch; use --device cpu")
    return parsed
