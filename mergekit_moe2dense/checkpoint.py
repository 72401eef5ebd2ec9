# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reading the source MoE: its config, its tensor index, and checks that it is whole."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import queue
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import transformers
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

from mergekit_moe2dense.direct_io import AlignedBuffer, DirectFile
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import (
    DEQUANTIZED_FORMATS,
    ExpertSlice,
    MoEFamily,
    MoELayer,
    TextPart,
    get_family,
    text_model_config,
    text_part,
)
from mergekit_moe2dense.fingerprint import content_fingerprint
from mergekit_moe2dense.prefetch import CHUNK, read_into_cache

LOG = logging.getLogger(__name__)


class CheckpointError(Moe2DenseError, ValueError):
    """The model directory is missing files, or a shard is truncated."""


class ShapeMismatchError(CheckpointError):
    """The tensors' shapes (or expert count) contradict config.json."""


@dataclass
class SourceModel:
    """The MoE to convert: config, family adapter, and where every tensor lives.

    For a multimodal checkpoint whose text model converts (`families.TEXT_PARTS`), that text
    model: `config` is its `text_config` and the index names its tensors as the text-only
    class does (`read_index`); `text_part` says where they are stored."""

    reference: ModelReference
    path: str
    config: transformers.PretrainedConfig
    family: MoEFamily
    index: ShardedTensorIndex
    text_part: TextPart | None = None

    @classmethod
    def open(cls, reference: ModelReference, trust_remote_code: bool = False) -> SourceModel:
        path = local_model_path(reference)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path} has no config.json")
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, OSError) as error:
            _refuse_remote_code(path)
            raise CheckpointError(f"{path}: cannot read config.json ({error})") from None
        family = get_family(config)
        part = text_part(config.model_type)
        if part is not None and part.multimodal:
            config = text_model_config(config)
            LOG.warning(  # shown by default (mergekit's logging: WARNING): the output has no vision
                "%s is a multimodal %s checkpoint: its text model (%s) is what is read and converted; %s is left out",
                path,
                part.model_type,
                config.model_type,
                part.dropped,
            )
        index = read_index(path)
        check_shards(index)
        check_quantized(index)
        check_shapes(config, family, index)
        return cls(reference, path, config, family, index, part)

    @functools.cached_property
    def reader(self) -> TensorReader:
        return TensorReader(self.index)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.index.tensor_paths)

    def rest_of_checkpoint(self, consumed: set[str]) -> list[str]:
        """The tensors every output copies unchanged: all but `consumed` (the converted blocks'),
        less the stored tensors that are not part of the model (`family.unbuilt_tensors`).

        Those are DeepSeek-V3's and GLM-4.5's multi-token-prediction layers: no output carries
        them (and its config says so, `outputs.base.write_model_files`) rather than converting
        them too: transformers ignores them on load and vLLM's MTP speculative decoding is
        opt-in, while converting their experts as the other layers' would need statistics of
        layers that no calibration pass runs through."""
        unbuilt = self.family.unbuilt_tensors(self.config, self.tensor_names)
        return [name for name in self.tensor_names if name not in consumed and name not in unbuilt]

    def moe_layers(self) -> list[MoELayer]:
        names = set(self.index.tensor_paths)
        return [
            self.family.resolve_layer(self.config, layer, names) for layer in self.family.moe_layer_indices(self.config)
        ]

    def fingerprint(self, layers: list[MoELayer]) -> dict[str, Any]:
        """What statistics recorded on this model are checked against (`RouterStatistics.check_model`).

        The statistics depend on the routers, the experts (their outputs feed the next layers)
        and everything upstream of them (embeddings, attention, norms), so the weights are
        identified by `content_fingerprint`, which samples every tensor; for a multimodal
        checkpoint that includes the vision tower, which the text model's statistics do not
        depend on: a vision-only change refuses them too (recalibrating is the cost, not a wrong
        result). The readable fields let a refusal say what differs."""
        return {
            "model_type": self.config.model_type,
            "layers": [layer.index for layer in layers],
            "num_experts": layers[0].num_experts if layers else 0,
            "content_sha256": content_fingerprint(self.path),
        }


# How far the merge and the layer stream read ahead of their position (page cache only):
# measured best of 0.25 / 1 GB on a 30 GB merge (docs/benchmarks.md).
READAHEAD_BYTES = 1 << 30
# Direct reads (`TensorReader(direct=True)`): pieces at least this large, read this much at a time
DIRECT_MIN_BYTES = 256 << 10
DIRECT_CHUNK_BYTES = 8 << 20

# safetensors' dtype names (the format's spec)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
if hasattr(torch, "float8_e8m0fnu"):  # power-of-two FP8 scales (ue8m0)
    _SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


@dataclass(frozen=True)
class QuantizedTensor:
    """A logical checkpoint tensor stored quantized, dequantized by `TensorReader` on read.

    `fp8`: block-wise FP8 (DeepSeek-V3, Qwen3 FP8): `data` is the FP8 weight, `scales`
    its `{name}_scale_inv` (one multiplier per `block` of rows x columns, or one per
    tensor when `block` is None). `mxfp4` (GPT-OSS): `data` is `{name}_blocks`
    [E, out, in/32, 16] (two FP4 values a byte), `scales` `{name}_scales` [E, out, in/32]
    (power-of-two exponents + 127); the logical tensor is transformers' in-memory
    [E, in, out].
    """

    kind: str
    data: str
    scales: str
    block: tuple[int, int] | None = None


@dataclass
class SourceIndex(ShardedTensorIndex):
    """mergekit's index of the checkpoint, with quantized tensors under their logical names:
    `tensor_paths` lists what the model holds (a scale tensor is no tensor of the model, so
    it is neither resolved nor copied); `stored` maps the raw data and scale tensors to
    their shards; `dtype` is what quantized tensors dequantize to when the caller names none
    (the config's `dtype`)."""

    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16
    # the text model's name -> the name stored in the shard, for a multimodal checkpoint's text
    # model (families.TextPart): every name above is the text model's
    renamed: dict[str, str] = field(default_factory=dict)

    def stored_name(self, name: str) -> str:
        """The name tensor `name` has in its shard."""
        return self.renamed.get(name, name)

    def stored_index(self) -> ShardedTensorIndex:
        """mergekit's index of the shards under their stored names (for its pickle loader)."""
        paths = {self.stored_name(name): shard for name, shard in self.tensor_paths.items()}
        return ShardedTensorIndex(
            base_path=self.base_path, is_safetensors=self.is_safetensors, tensor_paths=paths, shards=self.shards
        )


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

    With `direct`, tensors are read with `O_DIRECT` instead (`direct_io`: no copy out of the
    page cache, the merge's largest cost), `read_many` reads the next piece on a thread
    while the caller uses this one, and a tensor is read a chunk ahead the same way; where
    the file system has no `O_DIRECT` the reader reads as without it (and reads ahead with
    `readahead`).
    """

    def __init__(self, index: ShardedTensorIndex, readahead: int = 0, direct: bool = False):
        self.index = index
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
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
            self._ahead = _ReadAhead(shards, readahead)
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
        return tuple(piece.take(torch.empty(self._logical_shape(piece.tensor), device="meta")).shape)

    def file_position(self, name: str) -> str:
        """Where tensor `name` starts, as a string that sorts in file order (shards in name
        order, then byte offset); pickle shards sort by shard only."""
        shards = self._shard_order()
        shard = os.path.join(self.index.base_path, self.index.tensor_paths[name])
        stored = self._quantized[name].data if name in self._quantized else name  # where its bytes start
        offset = self._stored_entry(stored)[1] if self._fallback is None else 0
        return f"{shards.get(shard, len(shards)):06d}:{offset:016d}"

    def _shard_order(self) -> dict[str, int]:
        if not hasattr(self, "_shard_ordinals"):
            self._shard_ordinals = {path: i for i, path in enumerate(self._shard_paths())}
        return self._shard_ordinals

    def nbytes(self, piece: ExpertSlice) -> int:
        """Size of `piece` in bytes as read (stored, or dequantized), from a safetensors shard's header."""
        if piece.tensor in self._quantized or not piece.contiguous:
            return prod(self.shape(piece)) * self._logical_dtype(piece.tensor).itemsize
        _, _, dtype, shape = self._locate(piece)
        return prod(shape) * dtype.itemsize

    def _stored_name(self, name: str) -> str:
        return self.index.stored_name(name) if hasattr(self.index, "stored_name") else name

    @property
    def _quantized(self) -> dict[str, QuantizedTensor]:
        return getattr(self.index, "quantized", {})

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
        path, start, dtype, shape = self._locate(piece)
        nbytes = prod(shape) * dtype.itemsize
        file = self._direct_file(path) if self._direct is not None and nbytes >= DIRECT_MIN_BYTES else None
        if file is not None:
            return self._read_direct(file, piece, start, nbytes, dtype, shape, out)
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
        self,
        file: DirectFile,
        piece: ExpertSlice,
        start: int,
        nbytes: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """A contiguous piece with O_DIRECT, DIRECT_CHUNK_BYTES at a time through two reused aligned
        buffers: the worker thread reads the next chunk while this one is copied into `out` (cast
        to its dtype and moved to its device on the way: no temporary of the stored dtype)."""
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

    def _stored_entry(self, name: str) -> tuple[str, int, torch.dtype, tuple[int, ...]]:
        """Shard path, absolute data offset, dtype and shape of a stored tensor."""
        shard = self.index.tensor_paths.get(name) or getattr(self.index, "stored", {}).get(name)
        if shard is None:
            raise KeyError(name)
        path = os.path.join(self.index.base_path, shard)
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        data_start, header = self._headers[path]
        entry = header[self._stored_name(name)]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: unsupported dtype {entry['dtype']}")
        return path, data_start + entry["data_offsets"][0], _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def _logical_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as the model holds it (a dequantized tensor's, for quantized ones)."""
        quantized = self._quantized.get(name)
        if quantized is None:
            return self._stored_entry(name)[3]
        shape = self._stored_entry(quantized.data)[3]
        if quantized.kind == "fp8":
            return shape
        *prefix, groups, packed = shape  # mxfp4: [E, out, in/32, 16] holds [E, in, out]
        return (prefix[0], groups * packed * 2, *prefix[1:])

    def _logical_dtype(self, name: str) -> torch.dtype:
        return self.index.dtype if name in self._quantized else self._stored_entry(name)[2]

    def _locate(self, piece: ExpertSlice) -> tuple[str, int, torch.dtype, tuple[int, ...]]:
        """The shard, absolute byte offset, dtype and shape of a contiguous stored `piece`."""
        if piece.tensor not in self.index.tensor_paths and piece.tensor not in getattr(self.index, "stored", {}):
            raise KeyError(piece.tensor)
        path, offset, dtype, shape = self._stored_entry(piece.tensor)
        itemsize = dtype.itemsize
        if piece.expert is not None:  # dim 0 of a fused tensor: a contiguous block
            shape = shape[1:]
            offset += piece.expert * prod(shape) * itemsize
        if piece.rows is not None:  # a row range: contiguous too
            first, last = piece.rows
            offset += first * prod(shape[1:]) * itemsize
            shape = (last - first, *shape[1:])
        return path, offset, dtype, shape


class _ReadAhead:
    """A thread that keeps the page cache filled `window` bytes past the reader's
    position, across shard boundaries (shards in name order). Plain reads into one
    scratch buffer (`prefetch.read_into_cache`): only the page cache holds what it reads."""

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


def local_model_path(reference: ModelReference) -> str:
    """The model's directory: the local path, or mergekit's download of a hub id.

    mergekit sends every path that does not exist to the hub, where a local path
    fails with a repo-id validation traceback and an unreachable hub with a network
    one; both become one line naming the path.
    """
    if reference.lora is not None:  # mergekit's local_path() asserts on one
        raise CheckpointError(f"{reference}: a model+LoRA reference is not supported; merge the LoRA first")
    path = reference.model.path
    if not os.path.exists(path):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(path)
        except HFValidationError:  # not a hub id: a local path
            raise CheckpointError(f"model not found: no such directory {path}") from None
        try:
            path = reference.local_path()
        except Exception as error:  # hub, HTTP, offline-mode and OS errors alike
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise CheckpointError(
                f"model not found: {path} is not a local directory, and the Hugging Face hub "
                f"could not provide it ({reason})"
            ) from None
    if not os.path.isdir(path):
        raise CheckpointError(f"model not found: {path} is not a directory")
    return path


def _refuse_remote_code(path: str) -> None:
    """A config transformers cannot read natively because it names remote code (auto_map)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and raw.get("auto_map"):
        get_family(transformers.PretrainedConfig(**raw))  # raises the family/remote-code error


def read_index(path: str) -> ShardedTensorIndex:
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single) and not os.path.isfile(single + ".index.json"):
        _check_safetensors_size(single)  # before safetensors itself fails on it
    if not os.path.exists(single) and not os.path.exists(single + ".index.json"):
        for shard in _pickle_shards(path):
            check_pickle_shard(shard)  # before mergekit's loader unpickles it
    try:
        index = ShardedTensorIndex.from_disk(path)
    except RuntimeError:
        raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin") from None
    return _logical_index(index, _raw_config(path))


def _raw_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _logical_index(index: ShardedTensorIndex, config: dict) -> SourceIndex:
    """`index` with the quantized tensors of an FP8 or MXFP4 checkpoint under their logical
    names (`SourceIndex`). Whether a checkpoint is quantized, and how, comes from config.json's
    `quantization_config`; the families refuse the formats not listed in DEQUANTIZED_FORMATS.
    A multimodal checkpoint whose text model converts (its `model_type` in families.TEXT_PARTS)
    lists only that text model's tensors, under the names the text-only class gives them."""
    paths, renamed = dict(index.tensor_paths), {}
    part = text_part(config.get("model_type"))
    if part is not None:
        paths = {}
        for stored_name, shard in index.tensor_paths.items():
            name = part.text_name(stored_name)
            if name is not None:
                paths[name] = shard
                if name != stored_name:
                    renamed[name] = stored_name
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.bfloat16
    quantized, stored = {}, {}
    if method in DEQUANTIZED_FORMATS and not index.is_safetensors:
        raise CheckpointError(
            f"{index.base_path}: a {method} checkpoint in pickle format cannot be dequantized on read (use safetensors)"
        )
    if method == "fp8":
        block = quantization.get("weight_block_size")
        block = tuple(block) if block else None
        for name in [n for n in paths if n.endswith("_scale_inv")]:
            data = name.removesuffix("_scale_inv")
            if data in paths:
                quantized[data] = QuantizedTensor("fp8", data, name, block)
                stored[data], stored[name] = paths[data], paths.pop(name)
        for name in [n for n in paths if n.endswith(".activation_scale")]:  # static activation scales: unused
            stored[name] = paths.pop(name)
    elif method == "mxfp4":
        for name in [n for n in paths if n.endswith("_blocks")]:
            data, scales = name, name.removesuffix("_blocks") + "_scales"
            if scales in paths:
                logical = name.removesuffix("_blocks")
                quantized[logical] = QuantizedTensor("mxfp4", data, scales)
                stored[data], stored[scales] = paths.pop(data), paths.pop(scales)
                paths[logical] = stored[data]
    return SourceIndex(
        base_path=index.base_path,
        is_safetensors=index.is_safetensors,
        tensor_paths=paths,
        shards=index.shards,
        quantized=quantized,
        stored=stored,
        dtype=dtype,
        renamed=renamed,
    )


def _pickle_shards(path: str) -> list[str]:
    """The `.bin` files of a pickle checkpoint (one file, or those its index names)."""
    single = os.path.join(path, "pytorch_model.bin")
    try:
        with open(single + ".index.json", encoding="utf-8") as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
    except FileNotFoundError:
        return [single] if os.path.isfile(single) else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{single}.index.json is not a valid checkpoint index") from None
    # a missing shard is reported by check_shards
    return [os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))]


def check_pickle_shard(shard: str) -> None:
    """A pickle shard holds only tensors (and plain containers), and is readable.

    Loaded with torch's restricted unpickler (`weights_only`) onto the meta device, so
    nothing is executed and no tensor data is read. mergekit lists a single-file
    checkpoint with a bare `torch.load`, which on torch < 2.6 would run any code in
    the pickle; after this check every loader only meets what the safe one accepted.
    """
    try:
        torch.load(shard, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f"it names {found.group(1)}" if found else _first_sentence(error)
        raise CheckpointError(
            f"{shard}: refused: this pickle-format checkpoint holds more than tensors ({reason}), and "
            f"unpickling it could run code. If you trust it, convert it to safetensors: {_conversion_command(shard)}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:  # torch's zip reader raises RuntimeError
        raise CheckpointError(
            f"{shard}: pickle-format checkpoint is truncated or corrupt ({_first_sentence(error)})"
        ) from None


def _conversion_command(shard: str) -> str:
    """A shell command that writes the safetensors twin of the pickle checkpoint
    holding `shard`; safetensors files are read in preference to `.bin` ones.
    (transformers 5 cannot do it: `from_pretrained` ignores `weights_only=False`.)"""
    directory = os.path.dirname(shard)

    def tensors(file: str) -> str:
        return (
            f"{{k: v.contiguous().clone() for k, v in torch.load({file}, weights_only=False).items() "
            "if isinstance(v, torch.Tensor)}"
        )

    code = "import json, torch; from safetensors.torch import save_file; "
    if os.path.basename(shard) == "pytorch_model.bin":
        target = os.path.join(directory, "model.safetensors")
        code += f"save_file({tensors(repr(shard))}, {target!r}, metadata={{'format': 'pt'}})"
    else:  # sharded: every shard, then the index
        each = tensors("f'{d}/{n}'")
        code += (
            f"d = {directory!r}; m = json.load(open(d + '/pytorch_model.bin.index.json'))['weight_map']; "
            "new = {n: n.replace('pytorch_model', 'model').removesuffix('.bin') + '.safetensors' for n in set(m.values())}; "
            f"[save_file({each}, f'{{d}}/{{s}}', metadata={{'format': 'pt'}}) for n, s in new.items()]; "
            "json.dump({'metadata': {}, 'weight_map': {k: new[n] for k, n in m.items()}}, open(d + '/model.safetensors.index.json', 'w'))"
        )
    return f'python -c "{code}"'


def _first_sentence(error: BaseException) -> str:
    """torch's messages run to several sentences and lines of advice."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return re.split(r"\.\s", text)[0].rstrip(".")


def check_shards(index: ShardedTensorIndex) -> None:
    """Every shard named by the index exists, and every safetensors shard is complete.

    Checked up front so a broken download fails in seconds, not after calibration.
    """
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing shard {shard.filename} in {index.base_path}")
        if index.is_safetensors:
            _check_safetensors_size(path)


def check_quantized(index: ShardedTensorIndex) -> None:
    """Every quantized tensor's data and scales agree (headers only): FP8 data in an FP8
    dtype with one scale per block (`weight_block_size`, the last block of a dimension
    may be partial); MXFP4 blocks [E, out, in/32, 16] bytes with scales [E, out, in/32]."""
    quantized = getattr(index, "quantized", {})
    if not quantized:
        return
    reader = TensorReader(index)
    for name, q in quantized.items():
        _, _, data_dtype, data = reader._stored_entry(q.data)
        _, _, _, scales = reader._stored_entry(q.scales)
        if q.kind == "fp8":
            if data_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise ShapeMismatchError(f"{name} has a {q.scales} but is stored as {data_dtype}, not FP8")
            if q.block is None:
                expected = scales if prod(scales) == 1 else (1,)
            else:
                expected = (*data[:-2], *(-(-size // block) for size, block in zip(data[-2:], q.block)))
            what = f"weight_block_size {list(q.block)}" if q.block else "one scale per tensor"
        else:
            expected = data[:-1]
            what = "one exponent per 32 values"
            if data_dtype != torch.uint8 or len(data) != 4 or data[-1] != 16:
                raise ShapeMismatchError(
                    f"{q.data} has shape {list(data)} ({data_dtype}): MXFP4 experts are uint8 [E, out, in/32, 16]"
                )
        if tuple(scales) != tuple(expected):
            raise ShapeMismatchError(
                f"{q.scales} has shape {list(scales)}, {list(expected)} expected for {name} {list(data)} ({what})"
            )


def check_shapes(config: transformers.PretrainedConfig, family: MoEFamily, index: ShardedTensorIndex) -> None:
    """Every shape the conversion relies on agrees with config.json: per MoE layer the
    stored experts (per-expert names, or the E dim of fused tensors), each expert's
    gate/up [I, H] and down [H, I], the router [E, H], shared experts and router
    extras; the MLPs of layers that are dense already. Read from the shard headers
    only, before any work (pickle `.bin` shards have no headers: not checked).
    """
    if not index.is_safetensors:
        return
    names = set(index.tensor_paths)
    reader = TensorReader(index)
    declared = family.num_experts(config)
    context = family.describe_dims(config)
    stored = family.stored_experts(names)
    moe_layers = family.moe_layer_indices(config)
    for layer_index in moe_layers:
        layer = family.resolve_layer(config, layer_index, names)
        experts = stored.get(layer_index)
        if experts is not None:
            extra = sorted(set(experts) - set(range(declared)))
            if extra:
                raise ShapeMismatchError(
                    f"{experts[extra[0]]} is in the checkpoint, but config.json declares {declared} experts "
                    f"({context}); layer {layer_index} stores {len(experts)}"
                )
        expected = family.expected_shapes(config, layer, names)
        for name in expected:
            if name not in names:
                have = f"; layer {layer_index} stores {len(experts)}" if experts is not None else ""
                raise ShapeMismatchError(
                    f"{name} is missing from the checkpoint: config.json declares {declared} experts ({context}){have}"
                )
        for name, shape in expected.items():
            _check_shape(reader, name, shape, context)
    dense_width = family.dense_layer_width(config)
    if dense_width is not None:
        hidden = family.dims(config)["H"]
        implied = {"gate": (dense_width, hidden), "up": (dense_width, hidden), "down": (hidden, dense_width)}
        keys = f"{family.keys.dense_width}: {dense_width}, {family.keys.hidden}: {hidden}"
        for layer_index in sorted(set(range(config.num_hidden_layers)) - set(moe_layers)):
            for projection, name in family.dense_mlp_names(layer_index).items():
                if name in names:  # a missing dense MLP is reported by the merge, naming it
                    _check_shape(reader, name, implied[projection], keys)


def _check_shape(reader: TensorReader, name: str, shape: tuple[int, ...], context: str) -> None:
    found = reader.shape(ExpertSlice(name))
    if tuple(found) != tuple(shape):
        raise ShapeMismatchError(
            f"{name} has shape {list(found)} in the checkpoint, config.json implies {list(shape)} ({context})"
        )


def _read_header(path: str) -> tuple[int, dict[str, Any]]:
    """A safetensors shard's header, and the offset where its data starts."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"shard {path} is truncated or corrupt (unreadable header)") from None
    return 8 + header_len, header


def _check_safetensors_size(path: str) -> None:
    data_start, header = _read_header(path)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) < data_start + end:
        raise CheckpointError(
            f"shard {path} is truncated: {os.path.getsize(path)} bytes, its header needs {data_start + end}"
        )
