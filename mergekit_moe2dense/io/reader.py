# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`TensorReader`: the one reader of the source checkpoint's tensors.

Whole tensors, or one expert's rows of a fused tensor, read straight into the caller's memory:
with plain reads through the page cache and a thread reading ahead of them (`prefetch.py`), or
with `O_DIRECT` (`direct.py`) pipelined on a worker thread; quantized tensors dequantized on read
with transformers' own code; pickle shards through mergekit's loader.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from math import prod

import torch
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io.direct import AlignedBuffer, DirectFile
from mergekit_moe2dense.io.headers import Entry, ShardHeaders
from mergekit_moe2dense.io.index import QuantizedTensor
from mergekit_moe2dense.io.prefetch import ReadAhead

__all__ = ["DIRECT_CHUNK_BYTES", "DIRECT_MIN_BYTES", "READAHEAD_BYTES", "TensorReader"]

# How far the merge and the layer stream read ahead of their position (page cache only):
# measured best of 0.25 / 1 GB on a 30 GB merge (docs/benchmarks.md).
READAHEAD_BYTES = 1 << 30
# Direct reads (`TensorReader(direct=True)`): pieces at least this large, read this much at a time
DIRECT_MIN_BYTES = 256 << 10
DIRECT_CHUNK_BYTES = 8 << 20


class TensorReader:
    """Reads checkpoint tensors, or one expert's rows of a fused tensor, with plain
    reads straight into the caller's memory.

    mergekit's lazy loader maps whole shards with mmap: every page touched stays in
    the process's RSS until the shard is closed, and a fused `[E, ...]` tensor is
    read whole to use one expert. Here a tensor (or an `ExpertSlice`, a contiguous
    byte range) is `pread` into `out` when dtypes match, else into one temporary of
    the stored dtype. The bytes pass through the page cache, which the kernel owns.
    Shards in pickle format (`.bin`) fall back to mergekit's loader.

    With `readahead` (bytes), a background thread reads that far past the last byte
    read, into the page cache, so the disk works while the caller computes (the
    checkpoint is read mostly in file order: layer after layer). Close the reader
    to stop it.

    With `direct`, tensors are read with `O_DIRECT` instead (`direct.py`: no copy out of the
    page cache, the merge's largest cost), `read_many` reads the next piece on a thread
    while the caller uses this one, and a tensor is read a chunk ahead the same way; where
    the file system has no `O_DIRECT` the reader reads as without it (and reads ahead with
    `readahead`).
    """

    def __init__(self, index: ShardedTensorIndex, readahead: int = 0, direct: bool = False):
        self.index = index
        self._headers = ShardHeaders(index)
        self._local = threading.local()  # read_transient's buffer, one per thread
        self._fallback = None
        if not index.is_safetensors:
            self._fallback = LazyTensorLoader(index.stored_index() if hasattr(index, "stored_index") else index)
        self._direct: dict[str, DirectFile | None] | None = None  # shard -> its direct reader (None: none)
        self._direct_lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        shards = self._shard_paths()
        if direct and self._fallback is None and shards:
            self._direct = {}
            if self._direct_file(shards[0]) is None:
                self._direct = None  # no O_DIRECT on this file system
        if readahead and self._fallback is None and self._direct is None:
            self._ahead = ReadAhead(shards, readahead)
        else:
            self._ahead = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the read-ahead thread, if any, and closes the direct readers' files."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        with self._direct_lock:
            for file in (self._direct or {}).values():
                if file is not None:
                    file.close()
            if self._direct:
                self._direct.clear()

    def _direct_file(self, path: str) -> DirectFile | None:
        with self._direct_lock:
            if path not in self._direct:
                self._direct[path] = DirectFile.open(path)
            return self._direct[path]

    def _shard_paths(self) -> list[str]:
        return sorted(os.path.join(self.index.base_path, shard.filename) for shard in self.index.shards)

    def read(self, name: str, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `name`, written into `out` (any dtype, device) if given; a
        quantized tensor is dequantized to `out`'s dtype, else `dtype`, else the model's."""
        return self.read_slice(ExpertSlice(name), out, dtype)

    def shape(self, piece: ExpertSlice) -> tuple[int, ...]:
        """The shape of `piece`, from the shard's header (no tensor data is read)."""
        if self._fallback is not None:
            return tuple(piece.take(self._fallback.get_tensor(self._stored_name(piece.tensor))).shape)
        if piece.contiguous and piece.tensor not in self._quantized:
            return self._locate(piece)[3]
        return tuple(piece.take(torch.empty(self._headers.logical_shape(piece.tensor), device="meta")).shape)

    def file_position(self, name: str) -> str:
        """Where tensor `name` starts, as a string that sorts in file order (shards in name
        order, then byte offset); pickle shards sort by shard only."""
        shards = self._shard_order()
        paths = self.index.tensor_paths if name in self.index.tensor_paths else getattr(self.index, "stored", {})
        shard = os.path.join(self.index.base_path, paths[name])
        stored = self._quantized[name].data if name in self._quantized else name  # where its bytes start
        offset = self._headers.entry(stored)[1] if self._fallback is None else 0
        return f"{shards.get(shard, len(shards)):06d}:{offset:016d}"

    def _shard_order(self) -> dict[str, int]:
        if not hasattr(self, "_shard_ordinals"):
            self._shard_ordinals = {path: i for i, path in enumerate(self._shard_paths())}
        return self._shard_ordinals

    def nbytes(self, piece: ExpertSlice) -> int:
        """Size of `piece` in bytes as read (stored, or dequantized), from a safetensors shard's header."""
        if piece.tensor in self._quantized or not piece.contiguous:
            return prod(self.shape(piece)) * self._headers.logical_dtype(piece.tensor).itemsize
        _, _, dtype, shape = self._locate(piece)
        return prod(shape) * dtype.itemsize

    def _stored_name(self, name: str) -> str:
        return self._headers.stored_name(name)

    @property
    def _quantized(self) -> dict[str, QuantizedTensor]:
        return self._headers.quantized

    def read_slice(
        self, piece: ExpertSlice, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One expert's projection (`piece.take` of its tensor), into `out` if given.

        Quantized tensors are read (one expert's bytes and scales, for an expert of a
        fused tensor) and dequantized with transformers' own code to `out`'s dtype, else
        `dtype`, else the model's; strided or transposed slices read their expert's
        contiguous bytes and select from those.

        `units` (alignment) reorder the hidden units of the slice as stored."""
        if piece.units is not None:  # read as stored, then reorder its hidden units
            value = piece.permute(self.read_slice(piece.stored, dtype=out.dtype if out is not None else dtype))
            return value if out is None else out.copy_(value)
        if self._fallback is not None:
            value = piece.take(self._fallback.get_tensor(self._stored_name(piece.tensor)))
            return value if out is None else out.copy_(value)
        if piece.tensor in self._quantized:
            target_dtype = out.dtype if out is not None else dtype or self.index.dtype
            value = piece.within(self._dequantize(piece.tensor, piece.expert, target_dtype))
        elif not piece.contiguous:
            value = piece.within(self._read_bytes(ExpertSlice(piece.tensor, piece.expert)))
        else:
            return self._read_bytes(piece, out)
        if out is None:
            return value.contiguous()
        if tuple(out.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{piece.tensor}: checkpoint shape {list(value.shape)}, model expects {list(out.shape)}"
            )
        return out.copy_(value)

    def read_stored(self, piece: ExpertSlice) -> torch.Tensor:
        """The bytes of a contiguous `piece` of a stored tensor (a quantized tensor's data or
        scales included) in its stored dtype, never dequantized: what a quantized output copies."""
        if self._fallback is not None or not piece.contiguous or piece.units is not None:
            raise ValueError(f"{piece.tensor}: only contiguous pieces of safetensors shards are read as stored")
        return self._read_bytes(piece)

    def read_transient(self, piece: ExpertSlice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`read_slice(piece, dtype=dtype)` into a buffer this thread reuses: the result is valid
        until the thread's next `read_transient`. For loops that use up each piece before reading
        the next (the merge's weighted sum). A fresh tensor per read lands on new pages (the
        writer hands freed ones back to the OS), and faulting them in made the copy out of the
        page cache ~10x slower than into memory already mapped (1.25 against 12 GB/s)."""
        if piece.contiguous and piece.units is None and self._fallback is None and piece.tensor not in self._quantized:
            _, _, stored, shape = self._locate(piece)
            return self._read_bytes(piece, self._scratch(stored, shape))  # as stored, as read_slice gives it
        return self.read_slice(piece, dtype=dtype)

    def read_many(self, pieces: Sequence[ExpertSlice], dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """`read_transient` of each piece in turn, each valid until the next is taken. With
        `direct`, the next piece is read on a thread, with O_DIRECT, while the caller uses this
        one (two reused buffers: the merge's disk and arithmetic overlap)."""
        located = [self._direct_piece(piece) for piece in pieces]
        if not any(located):
            yield from (self.read_transient(piece, dtype) for piece in pieces)
            return
        buffers = self._aligned_pair("pipeline")
        worker = self._direct_worker()
        pending: dict[int, Future] = {}

        def submit(i: int) -> None:
            if i < len(pieces) and located[i] is not None:
                file, start, nbytes = located[i][:3]
                pending[i] = worker.submit(file.read, start, nbytes, buffers[i % 2])

        try:
            submit(0)
            for i, piece in enumerate(pieces):
                submit(i + 1)  # into the buffer of piece i - 1, which the caller is done with
                if located[i] is None:
                    yield self.read_transient(piece, dtype)
                    continue
                _, _, nbytes, stored, shape = located[i]
                memory, offset = self._checked(pending.pop(i), piece)
                yield torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset).view(stored).view(shape)
        finally:
            for future in pending.values():  # a read still writing into a buffer: let it finish
                future.cancel() or future.exception()

    def _direct_piece(self, piece: ExpertSlice) -> tuple[DirectFile, int, int, torch.dtype, tuple[int, ...]] | None:
        """(file, start, nbytes, dtype, shape) of a piece read_many reads directly, else None."""
        if self._direct is None or not piece.contiguous or piece.units is not None or piece.tensor in self._quantized:
            return None
        path, start, stored, shape = self._locate(piece)
        nbytes = prod(shape) * stored.itemsize
        file = self._direct_file(path) if nbytes >= DIRECT_MIN_BYTES else None
        return None if file is None else (file, start, nbytes, stored, shape)

    def _aligned_pair(self, name: str) -> tuple[AlignedBuffer, AlignedBuffer]:
        """This thread's two buffers for one use (`read_many`'s, or a tensor's chunks): a piece
        read into one while the caller uses the other."""
        pair = getattr(self._local, name, None)
        if pair is None:
            pair = (AlignedBuffer(), AlignedBuffer())
            setattr(self._local, name, pair)
        return pair

    def _direct_worker(self) -> ThreadPoolExecutor:
        """The one thread direct reads run on while their caller uses the bytes read before."""
        with self._direct_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe2dense-direct")
            return self._worker

    @staticmethod
    def _checked(future: Future, piece: ExpertSlice):
        try:
            return future.result()
        except EOFError as error:
            raise CheckpointError(f"shard ended inside tensor {piece.tensor}: {error}") from None

    def _scratch(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = prod(shape) * dtype.itemsize
        buffer = getattr(self._local, "scratch", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.scratch = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)

    def _read_bytes(self, piece: ExpertSlice, out: torch.Tensor | None = None) -> torch.Tensor:
        """A contiguous piece as stored, with plain reads (into `out` when dtypes match)."""
        location = path, start, dtype, shape = self._locate(piece)
        nbytes = prod(shape) * dtype.itemsize
        file = self._direct_file(path) if self._direct is not None and nbytes >= DIRECT_MIN_BYTES else None
        if file is not None:
            return self._read_direct(file, piece, location, out)
        direct = out is not None and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        if direct and tuple(out.shape) != shape:
            raise CheckpointError(f"{piece.tensor}: checkpoint shape {list(shape)}, model expects {list(out.shape)}")
        target = out if direct else torch.empty(shape, dtype=dtype)
        buffer = memoryview(target.view(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as handle:
            done = 0
            while done < len(buffer):
                count = os.preadv(handle.fileno(), [buffer[done:]], start + done)
                if count == 0:
                    raise CheckpointError(f"shard {path} ended inside tensor {piece.tensor}")
                done += count
        if self._ahead is not None:
            self._ahead.advance(path, start + len(buffer))
        if out is None or direct:
            return target
        return out.copy_(target)

    def _read_direct(
        self, file: DirectFile, piece: ExpertSlice, location: Entry, out: torch.Tensor | None
    ) -> torch.Tensor:
        """A contiguous piece (at `location`, as `_locate` gives it) with O_DIRECT, DIRECT_CHUNK_BYTES
        at a time through two reused aligned buffers: the worker thread reads the next chunk while
        this one is copied into `out` (cast to its dtype and moved to its device on the way: no
        temporary of the stored dtype)."""
        _, start, dtype, shape = location
        nbytes = prod(shape) * dtype.itemsize
        if out is not None and tuple(out.shape) != shape:
            raise CheckpointError(f"{piece.tensor}: checkpoint shape {list(shape)}, model expects {list(out.shape)}")
        into = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=dtype)
        flat = into.view(-1)
        staging = self._aligned_pair("staging")
        worker = self._direct_worker()
        chunks = range(0, nbytes, DIRECT_CHUNK_BYTES)  # a multiple of every itemsize: whole elements

        def submit(k: int) -> Future:
            done = chunks[k]
            return worker.submit(file.read, start + done, min(DIRECT_CHUNK_BYTES, nbytes - done), staging[k % 2])

        pending = submit(0)
        try:
            for k, done in enumerate(chunks):
                count = min(DIRECT_CHUNK_BYTES, nbytes - done)
                memory, offset = self._checked(pending, piece)
                # the next chunk goes into the other buffer, which the last copy is done with
                pending = submit(k + 1) if k + 1 < len(chunks) else None
                chunk = torch.frombuffer(memory, dtype=torch.uint8, count=count, offset=offset).view(dtype)
                flat[done // dtype.itemsize : (done + count) // dtype.itemsize].copy_(chunk)
        finally:
            if pending is not None:  # a read still writing into a buffer: let it finish
                pending.cancel() or pending.exception()
        return into if out is None or into is out else out.copy_(into)

    def _dequantize(self, name: str, expert: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The logical tensor `name` (or its expert `expert`) dequantized to `dtype`."""
        quantized = self._quantized[name]
        data = self._read_bytes(ExpertSlice(quantized.data, expert))
        scales = self._read_bytes(ExpertSlice(quantized.scales, expert))
        if quantized.kind == "fp8":
            from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

            block = list(quantized.block) if quantized.block is not None else None
            return _dequantize_fp8_weight(data, scales, block, dtype)
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        if expert is not None:  # transformers dequantizes [E, out, in/32, 16]: one expert as E = 1
            return convert_moe_packed_tensors(data[None], scales[None], dtype=dtype)[0]
        return convert_moe_packed_tensors(data, scales, dtype=dtype)

    def _locate(self, piece: ExpertSlice) -> tuple[str, int, torch.dtype, tuple[int, ...]]:
        """The shard, absolute byte offset, dtype and shape of a contiguous stored `piece`."""
        if not self._headers.is_stored(piece.tensor):
            raise KeyError(piece.tensor)
        path, offset, dtype, shape = self._headers.entry(piece.tensor)
        itemsize = dtype.itemsize
        if piece.expert is not None:  # dim 0 of a fused tensor: a contiguous block
            shape = shape[1:]
            offset += piece.expert * prod(shape) * itemsize
        if piece.rows is not None:  # a row range: contiguous too
            first, last = piece.rows
            offset += first * prod(shape[1:]) * itemsize
            shape = (last - first, *shape[1:])
        return path, offset, dtype, shape
