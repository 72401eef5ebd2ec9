# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""How a write graph reads the source checkpoint and writes the output (`TensorIO`): the
config's dtypes and mergekit's output options in one frozen value, which makes the graph's
read, save and writer tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mergekit.common import ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask

from mergekit_moe2dense.graph.quantized import QuantizedBytes
from mergekit_moe2dense.graph.tasks import ReadTensor, ShardWriterTask
from mergekit_moe2dense.io.writer import DEFAULT_HEADER_BYTES, header_bytes_for

__all__ = ["TensorIO"]


@dataclass(frozen=True)
class TensorIO:
    """How a graph reads the source checkpoint and writes the output: the config's dtypes
    and mergekit's output options, in one place."""

    model: ModelReference
    dtype: str | None = None  # of the merge arithmetic's inputs (None: as stored)
    out_dtype: str | None = None
    max_shard_size: int = 5 * 10**9
    safe_serialization: bool = True
    async_write: bool = False
    write_threads: int = 1
    clone_tensors: bool = False
    device: str | None = None  # of the merge arithmetic (None: CPU)
    # `source`: the tensors the source stores quantized are written in its format (graph/quantized.py);
    # `none`: every tensor dequantized, in `out_dtype`; `fp8`: the linear weights (and experts) in
    # block-wise FP8 with a scale per `fp8_block` (outputs/fp8.py)
    quantization: str = "none"
    fp8_block: tuple[int, int] = (128, 128)

    @classmethod
    def from_options(
        cls,
        model: ModelReference,
        dtype,
        out_dtype,
        options,
        quantization: str = "none",
        fp8_block: tuple[int, int] | None = None,
    ) -> TensorIO:
        return cls(
            model=model,
            dtype=dtype,
            out_dtype=out_dtype,
            quantization=quantization,
            fp8_block=tuple(fp8_block) if fp8_block is not None else (128, 128),
            max_shard_size=options.out_shard_size,
            safe_serialization=options.safe_serialization,
            async_write=options.async_write,
            write_threads=options.write_threads,
            clone_tensors=options.clone_tensors,
            device=options.device if options.device and options.device != "cpu" else None,
        )

    def read(self, name: str) -> ReadTensor:
        return ReadTensor(model=self.model, tensor=name, dtype=self.dtype)

    def writer(self, out_path: str, names: Sequence[str] | None = None) -> TensorWriterTask:
        """safetensors: a `ShardWriter` (tensors written as they come; `names`, the tensors it will
        get, size the shard headers); pickle: mergekit's writer (a shard is held until written)."""
        if self.safe_serialization:
            return ShardWriterTask(
                out_path=out_path,
                max_shard_size=self.max_shard_size,
                header_bytes=header_bytes_for(names) if names is not None else DEFAULT_HEADER_BYTES,
            )
        return TensorWriterTask(
            out_path=out_path,
            max_shard_size=self.max_shard_size,
            safe_serialization=self.safe_serialization,
            use_async=self.async_write,
            write_threads=self.write_threads,
        )

    def write_all(self, out_path: str, tensors: Sequence[tuple[str, Task]]) -> FinalizeModel:
        """The task that writes every (name, task) of `tensors` into one model directory."""
        writer = self.writer(out_path, [name for name, _ in tensors])
        saves = tuple(self.save(name, task, writer) for name, task in tensors)
        return FinalizeModel(tensor_save_tasks=saves, writer_task=writer)

    def save(self, name: str, task: Task, writer: TensorWriterTask) -> SaveTensor:
        """Written in `out_dtype`, but a quantized tensor's data and scales as they are."""
        dtype = None if isinstance(task, QuantizedBytes) else self.out_dtype
        return SaveTensor(tensor_name=name, tensor_task=task, writer_task=writer, clone=self.clone_tensors, dtype=dtype)
