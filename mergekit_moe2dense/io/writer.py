# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The output writer: safetensors shards written tensor by tensor, as the merge produces them.

mergekit's `TensorWriter` keeps every tensor of a shard in memory until the shard is full
(`--out-shard-size`, 5B parameters by default), then safetensors copies them once more into
bytes: a dense model smaller than one shard is held whole, twice, at the end of the merge, and
the merge's peak memory grew with the number of layers (5.6 GB for a 30 GB MoE).

`ShardWriter` has the same two methods (`save_tensor`, `finalize`), so mergekit's `SaveTensor`
and `FinalizeModel` tasks drive it unchanged. Each tensor is handed to one background thread,
which `pwrite`s its bytes into the open shard at once; at most `max_pending` bytes wait for it
(the merge computes the next projection, and the reader reads the next experts, meanwhile).
A shard file is laid out as safetensors requires (an 8-byte header length, the JSON header, the
data), with `header_bytes` reserved for the header when the shard opens; the header is written,
padded with spaces as safetensors itself pads, when the shard closes. A shard closes when the next
tensor would take it past `max_shard_size` bytes, would not fit in the reserved header, or would
start at an offset not aligned to its element size (safetensors readers view tensors in place).
`finalize` gives the shards mergekit's names (`model.safetensors`, or
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import weakref
from collections import deque
from collections.abc import Iterable

import torch

from mergekit_moe2dense.io.headers import SAFETENSORS_DTYPES
from mergekit_moe2dense.memory import release_freed_memory

__all__ = ["DEFAULT_HEADER_BYTES", "MAX_PENDING_BYTES", "ShardWriter", "abort_open_writers", "header_bytes_for"]

# What waits for the writing thread, at most (or one tensor, if larger).
MAX_PENDING_BYTES = 64 << 20
# Freed heap memory is handed back to the OS after every this many bytes written (about a layer).
TRIM_BYTES = 64 << 20
# The header reserve when the tensor names are not known up front.
DEFAULT_HEADER_BYTES = 256 << 10
# The longest header entry a tensor name adds, beyond its own JSON string: dtype, a shape of up to
# 8 dimensions and two offsets of up to 20 digits each, and the separators.
_ENTRY_BYTES = 64 + 8 * 21 + 2 * 21

# The dtypes a shard is written in, by their safetensors names (FP8 and its scales: quantized outputs)
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_METADATA = '"__metadata__":{"format":"pt"}'
# The writers whose thread runs. Module-level because mergekit's executor creates each writer
# (`graph.ShardWriterTask`) and keeps it to itself: a graph that fails reaches them only here.
_OPEN: weakref.WeakSet[ShardWriter] = weakref.WeakSet()


def header_bytes_for(names: Iterable[str]) -> int:
    """A header reserve that holds every one of `names` in one shard."""
    total = len(_METADATA) + 2 + sum(len(json.dumps(name)) + _ENTRY_BYTES for name in names)
    return (total + 7) // 8 * 8


class _Shard:
    def __init__(self, path: str, header_bytes: int):
        self.path = path
        self.header_bytes = header_bytes
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.entries: list[str] = []
        self.names: list[str] = []
        self.header_used = len(_METADATA) + 2  # the braces
        self.size = 0  # data bytes

    def entry(self, name: str, tensor: torch.Tensor) -> str:
        nbytes = tensor.numel() * tensor.element_size()
        meta = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        meta["data_offsets"] = [self.size, self.size + nbytes]
        return json.dumps(name) + ":" + json.dumps(meta, separators=(",", ":"))

    def fits(self, entry: str, nbytes: int, itemsize: int, max_size: int) -> bool:
        if not self.names:
            return len(entry) + 1 + self.header_used <= self.header_bytes
        return (
            (max_size <= 0 or self.size + nbytes <= max_size)
            and self.header_used + len(entry) + 1 <= self.header_bytes
            and self.size % itemsize == 0
        )

    def write(self, name: str, entry: str, tensor: torch.Tensor) -> None:
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        offset = 8 + self.header_bytes + self.size
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        self.entries.append(entry)
        self.names.append(name)
        self.header_used += len(entry) + 1
        self.size += len(data)

    def close(self) -> None:
        header = ("{" + ",".join([_METADATA, *self.entries]) + "}").encode()
        header += b" " * (self.header_bytes - len(header))
        os.pwrite(self.fd, struct.pack("<Q", self.header_bytes) + header, 0)
        os.close(self.fd)


def abort_open_writers() -> None:
    """Stops every writer that was not finalized (the graph that fed it failed)."""
    for writer in list(_OPEN):
        writer.abort()


class ShardWriter:
    """Writes safetensors shards into `out_path` as tensors arrive (see the module docstring)."""

    def __init__(
        self,
        out_path: str,
        max_shard_size: int = 5 * 10**9,
        header_bytes: int = DEFAULT_HEADER_BYTES,
        max_pending: int = MAX_PENDING_BYTES,
    ):
        os.makedirs(out_path, exist_ok=True)
        self.out_path = out_path
        self.max_shard_size = max_shard_size
        self.header_bytes = max(header_bytes, DEFAULT_HEADER_BYTES // 64)
        self.max_pending = max_pending
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._since_trim = 0
        self._shards: list[str] = []  # temporary file names, in order
        self._shard: _Shard | None = None
        self._queue: deque[tuple[str, torch.Tensor] | None] = deque()
        self._pending = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="moe2dense-writer", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # -- mergekit's TensorWriter interface ---------------------------------------------
    def save_tensor(self, name: str, tensor: torch.Tensor, clone: bool = False) -> None:
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: cannot write dtype {tensor.dtype} to safetensors")
        tensor = tensor.detach().to("cpu").contiguous()
        if clone:
            tensor = tensor.clone()
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            while self._error is None and self._pending and self._pending + nbytes > self.max_pending:
                self._cond.wait()
            self._raise()
            self._queue.append((name, tensor))
            self._pending += nbytes
            self._cond.notify_all()

    def finalize(self) -> None:
        """Waits for the writes, closes the last shard, names the shards and writes the index."""
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join()
        _OPEN.discard(self)
        if self._error is not None:
            self.abort()
            self._raise()
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        count = len(self._shards)
        names = {}
        for i, temporary in enumerate(self._shards):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.out_path, temporary), os.path.join(self.out_path, final))
            names[temporary] = final
        self.weight_map = {name: names[shard] for name, shard in self.weight_map.items()}
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            with open(os.path.join(self.out_path, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2)

    def abort(self) -> None:
        """Stops the thread and closes the open shard without finishing it (a failed run)."""
        with self._cond:
            self._queue.clear()
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join()
        _OPEN.discard(self)
        if self._shard is not None:
            os.close(self._shard.fd)
            self._shard = None

    # -- the writing thread ----------------------------------------------------------------
    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
            if item is None:
                return
            name, tensor = item
            nbytes = tensor.numel() * tensor.element_size()
            try:
                if self._error is None:
                    self._write(name, tensor)
            except BaseException as error:  # re-raised in the merge's thread
                self._error = error
            finally:
                del item, tensor
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map:
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shard
        if shard is None or not shard.fits(
            shard.entry(name, tensor), nbytes, tensor.element_size(), self.max_shard_size
        ):
            if shard is not None:
                shard.close()
            temporary = f".shard-{len(self._shards) + 1}.safetensors.partial"
            shard = self._shard = _Shard(os.path.join(self.out_path, temporary), self.header_bytes)
            self._shards.append(temporary)
            entry = shard.entry(name, tensor)
            if not shard.fits(entry, nbytes, tensor.element_size(), self.max_shard_size):
                raise ValueError(f"tensor name {name} is too long for the shard header")
        entry = shard.entry(name, tensor)
        shard.write(name, entry, tensor)
        self.weight_map[name] = self._shards[-1]
        self.total_size += nbytes
        self._since_trim += nbytes
        if self._since_trim >= TRIM_BYTES:  # the merge has freed a layer's experts meanwhile
            self._since_trim = 0
            release_freed_memory()
