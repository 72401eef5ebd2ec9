# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Asking the kernel to read checkpoint bytes into the page cache, without copying them here.

`posix_fadvise(WILLNEED)` (what readahead(2) does) starts the disk reading and returns: the
bytes land in the page cache, which the kernel owns, and cost this process neither RSS nor
the CPU time of a copy. Two users: `checkpoint.TensorReader`'s read-ahead thread, which keeps
a window filled past the reader, and the command line, which starts reading the model's first
shards while Python imports torch, transformers and mergekit (seconds the disk would
otherwise sit idle). Imports only the standard library, so the command line can call it first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["CAN_ADVISE", "CHUNK", "advise_willneed", "prefetch_model_start", "shard_paths"]

# Linux caps one request at the device's read-ahead size (read_ahead_kb, often 128 KB to 8 MB)
# and silently drops the rest: ask in chunks no larger than that cap
CHUNK = 2 << 20

_advise = getattr(os, "posix_fadvise", None)
CAN_ADVISE = _advise is not None


def advise_willneed(fd: int, start: int, end: int, keep_going: Callable[[], bool] = lambda: True) -> int:
    """Asks for bytes [start, end) of open file `fd`, chunk by chunk while `keep_going()`;
    returns how many bytes were asked for (0 where the call is missing: not Linux)."""
    if _advise is None:
        return 0
    asked = 0
    while start + asked < end and keep_going():
        size = min(CHUNK, end - start - asked)
        _advise(fd, start + asked, size, os.POSIX_FADV_WILLNEED)
        asked += size
    return asked


def shard_paths(model_dir: str) -> list[str]:
    """The model's safetensors shards in name order (the order their layers are stored in)."""
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(os.path.join(model_dir, name) for name in names if name.endswith(".safetensors"))


def prefetch_model_start(model_dir: str, nbytes: int) -> threading.Thread | None:
    """Starts a daemon thread asking for the first `nbytes` of `model_dir`'s shards (file order),
    or nothing when there are none. Only a hint: every error is ignored, the readers report
    missing or unreadable files themselves."""
    shards = shard_paths(model_dir)
    if not shards or _advise is None or nbytes <= 0:
        return None

    def run() -> None:
        budget = nbytes
        for shard in shards:
            try:
                fd = os.open(shard, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                budget -= advise_willneed(fd, 0, min(size, budget))
            except OSError:
                pass
            finally:
                os.close(fd)
            if budget <= 0:
                return

    thread = threading.Thread(target=run, name="moe2dense-prefetch", daemon=True)
    thread.start()
    return thread
