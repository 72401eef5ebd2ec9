# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Memory that the layer loops would keep without meaning to (freed heap pages, oneDNN's cache),
and the one place that asks private torch and CPython behaviour whether a tensor's memory may be
reused (`is_exclusively_held`)."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

__all__ = ["bound_onednn_primitive_cache", "is_exclusively_held", "release_freed_memory"]

# The versions whose reference counts `is_exclusively_held` relies on, first and last (major,
# minor), both included; elsewhere it answers False. tests/test_memory.py pins the behaviour; it
# ran on CPython 3.11-3.13 (3.10 counts one reference more per call, so the check never passed
# there anyway; 3.14 borrows references on its stack, counting fewer) and on torch 2.13; the
# lowest torch is the one the package requires. Raise a bound once the test passes beyond it.
TESTED_PYTHON = ((3, 11), (3, 13))
TESTED_TORCH = ((2, 4), (2, 13))


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


def is_exclusively_held(tensor: torch.Tensor, holders: int) -> bool:
    """Whether nothing but `holders` references the caller knows of (a module's parameter dict,
    the caller's own variable) holds `tensor`, and no other tensor (a view) shares its memory:
    then overwriting that memory changes nothing anyone else sees.

    Counted with CPython's reference count (`sys.getrefcount`, which also counts this function's
    argument and its own) and torch's private count of the references to a storage
    (`torch._C._storage_Use_Count`: one per tensor on it, plus the storage object asked for
    here). Where either is missing, or on versions not tested (`TESTED_PYTHON`, `TESTED_TORCH`),
    False: the caller then leaves the memory alone, which is slower but never wrong."""
    if not _REFERENCE_COUNTS_TESTED:
        return False
    return sys.getrefcount(tensor) <= holders + 2 and torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2


def _reference_counts_tested() -> bool:
    """Whether this interpreter and this torch are ones `is_exclusively_held` was tested on."""
    try:
        torch_version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:  # a version string of an unknown form
        return False
    return (
        sys.implementation.name == "cpython"
        and TESTED_PYTHON[0] <= sys.version_info[:2] <= TESTED_PYTHON[1]
        and TESTED_TORCH[0] <= torch_version <= TESTED_TORCH[1]
        and hasattr(torch._C, "_storage_Use_Count")
        and hasattr(torch.UntypedStorage, "_cdata")
    )


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


# Found once: ctypes looks libc up, and both are constants for the life of the process
_malloc_trim = _find_malloc_trim()
_REFERENCE_COUNTS_TESTED = _reference_counts_tested()
