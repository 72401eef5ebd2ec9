# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reading checkpoint bytes ahead into the page cache, so the disk works while we compute.

Two users: `checkpoint.TensorReader`'s read-ahead thread, which keeps a window filled past the
reader, and the command line, which starts reading the model's first shards while Python
imports torch, transformers and mergekit (seconds in which a cold disk would sit idle).

Plain reads into one small scratch buffer: they go through the kernel's own read-ahead, which
fills the page cache with large folios. `posix_fadvise(WILLNEED)` would spare the copy, but it
fills the cache page by page, and copying those pages out later was 5x slower (3 against
17 GB/s): a 30 GB merge took 71 s with it, 53 s with reads (docs/results/scale.md, "Merge").
Imports only the standard library, so the command line can call it first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["CHUNK", "available_memory", "prefetch_model_start", "read_into_cache", "shard_paths"]

CHUNK = 4 << 20  # the scratch buffer is RSS: the layer stream budgets memory tightly


def read_into_cache(
    fd: int, start: int, end: int, scratch: memoryview, keep_going: Callable[[], bool] = lambda: True
) -> int:
    """Reads bytes [start, end) of open file `fd` into `scratch` chunk by chunk (only the page
    cache keeps them), while `keep_going()`; returns how many bytes were read."""
    read = 0
    while start + read < end and keep_going():
        count = os.preadv(fd, [scratch[: min(len(scratch), end - start - read)]], start + read)
        if count == 0:
            break
        read += count
    return read


def shard_paths(model_dir: str) -> list[str]:
    """The model's safetensors shards in name order (the order their layers are stored in)."""
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(os.path.join(model_dir, name) for name in names if name.endswith(".safetensors"))


def prefetch_model_start(model_dir: str, nbytes: int) -> threading.Thread | None:
    """Starts a daemon thread reading the first `nbytes` of `model_dir`'s shards (file order)
    into the page cache, or nothing when there are none. Only a hint: every error is ignored,
    the readers report missing or unreadable files themselves."""
    shards = shard_paths(model_dir)
    if not shards or nbytes <= 0:
        return None

    def run() -> None:
        scratch = memoryview(bytearray(CHUNK))
        budget = nbytes
        for shard in shards:
            try:
                fd = os.open(shard, os.O_RDONLY)
            except OSError:
                continue
            try:
                budget -= read_into_cache(fd, 0, min(os.fstat(fd).st_size, budget), scratch)
            except OSError:
                pass
            finally:
                os.close(fd)
            if budget <= 0:
                return

    thread = threading.Thread(target=run, name="moe2dense-prefetch", daemon=True)
    thread.start()
    return thread


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable: free pages plus the page cache
    it can drop); the free pages alone where /proc/meminfo is missing. A full page cache, as
    right after writing a checkpoint, leaves few free pages but much available memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
