# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reading checkpoint bytes ahead into the page cache, so the disk works while we compute.

Two users: `reader.TensorReader`'s read-ahead thread (`ReadAhead`), which keeps a window filled
past the reader, and the command line, which starts reading the model's first shards while Python
imports torch, transformers and mergekit (seconds in which a cold disk would sit idle).

Plain reads into one small scratch buffer: they go through the kernel's own read-ahead, which
fills the page cache with large folios. `posix_fadvise(WILLNEED)` would spare the copy, but it
fills the cache page by page, and copying those pages out later was 5x slower (3 against
17 GB/s): a 30 GB merge took 71 s with it, 53 s with reads (docs/results/scale.md, "Merge").
Imports only the standard library, so the command line can call it first.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

__all__ = ["CHUNK", "ReadAhead", "available_memory", "prefetch_model_start", "read_into_cache", "shard_paths"]

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


class ReadAhead:
    """A thread that keeps the page cache filled `window` bytes past the reader's
    position, across shard boundaries (shards in name order). Plain reads into one
    scratch buffer (`read_into_cache`): only the page cache holds what it reads."""

    def __init__(self, shards: list[str], window: int):
        self.shards, self.window = shards, window
        self.sizes = [os.path.getsize(shard) for shard in shards]
        self.positions: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="moe2dense-readahead", daemon=True)
        self.thread.start()

    def advance(self, path: str, offset: int) -> None:
        self.positions.put((path, offset))

    def close(self) -> None:
        self.positions.put(None)
        self.thread.join()

    def _run(self) -> None:
        scratch = memoryview(bytearray(CHUNK))
        done: dict[str, int] = {}  # per shard: read up to here
        while True:
            position = self.positions.get()
            while position is not None and not self.positions.empty():
                position = self.positions.get()  # only the newest position matters
            if position is None:
                return
            path, offset = position
            budget = self.window
            index = self.shards.index(path) if path in self.shards else len(self.shards)
            while budget > 0 and index < len(self.shards) and self.positions.empty():
                shard = self.shards[index]
                end = min(offset + budget, self.sizes[index])
                start = max(offset, done.get(shard, 0))
                if start < end:
                    done[shard] = start + self._fill(shard, start, end, scratch)
                budget -= end - offset
                index, offset = index + 1, 0

    def _fill(self, shard: str, start: int, end: int, scratch: memoryview) -> int:
        """Reads shard bytes [start, end) in chunks; stops early if the reader moved on."""
        try:
            fd = os.open(shard, os.O_RDONLY)
        except OSError:  # the reader itself reports missing files; this is only a hint
            return 0
        try:
            return read_into_cache(fd, start, end, scratch, self.positions.empty)
        except OSError:
            return 0
        finally:
            os.close(fd)


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
