# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Memory that the layer loops would keep without meaning to: freed heap pages, oneDNN's cache."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["bound_onednn_primitive_cache", "release_freed_memory"]


def release_freed_memory() -> None:
    """Hands the heap's free pages back to the OS (glibc `malloc_trim`).

    A freed layer's mid-sized tensors stay in glibc's heaps, fragmented (and, with the
    read-ahead and writer threads, in several arenas): RSS grew by ~7 MB per streamed layer
    of the 4 GB benchmark. One trim per layer keeps it flat. A no-op off glibc.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def bound_onednn_primitive_cache() -> None:
    """Turns oneDNN's cache of matmul primitives off for this process, unless the user set
    ONEDNN_PRIMITIVE_CACHE_CAPACITY; called where a conversion or a calibration starts.

    The layer loops multiply bf16 matrices (on the CPU, through oneDNN) of a new shape in every
    layer, the tokens each expert gets, and the cache kept a primitive for each: 0.14 GB more
    peak for a 4 GB checkpoint's streamed calibration (docs/results/scale.md). Training and
    evaluation repeat their shapes and need the cache (a bf16 training step took 2-2.5x as long
    without it), so importing the package leaves it alone, and so do `heal`, `collapse` and
    `eval`. oneDNN reads the variable at its first matmul: after that this changes nothing.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_malloc_trim = _find_malloc_trim()
