# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The mergekit `Task`s of the write graph: read a tensor, merge a block of experts, join
blocks, pad, stack a fused layout, a zero tensor, a tensor computed in memory, and the
safetensors writer. Each is a frozen, hashable value; what one needs at run time beyond its
fields (an open reader, an in-memory tensor) it looks up by key in `resources.graph_resources`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import TensorWriterTask

from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.families.spec import FusedLayout
from mergekit_moe2dense.graph.resources import graph_resources
from mergekit_moe2dense.io.writer import DEFAULT_HEADER_BYTES, ShardWriter
from mergekit_moe2dense.merge import join_blocks
from mergekit_moe2dense.methods.kernel import weighted_sum

__all__ = [
    "ComputedTensor",
    "FuseExpert",
    "JoinBlocks",
    "MergeExperts",
    "PadIntermediate",
    "ReadTensor",
    "ShardWriterTask",
    "ZeroTensor",
    "computed_tensors",
]


class ReadTensor(Task[torch.Tensor]):
    """One tensor of the source checkpoint, read with `io.reader.TensorReader`.

    mergekit's `LoadTensor` reads through memory-mapped shards, one page fault at a
    time, and holds the pages in RSS; a 30 GB merge took 2.3x the time of reading the
    files once (docs/benchmarks.md). `O_DIRECT` reads (plain ones, with a thread reading
    ahead, where the file system has none) skip the page cache's copy.
    """

    model: ModelReference
    tensor: str
    dtype: str | None = None

    def arguments(self) -> dict[str, Task]:
        return {}

    def priority(self) -> int:
        return -1000  # as LoadTensor: read as late as possible, freed soon after

    def group_label(self) -> str | None:
        # mergekit's executor runs the ready task of the smallest label first: the shard and byte
        # offset make that the checkpoint's file order (the tensor name would put layer 10 before 2),
        # so reads follow the file and each layer is merged and written before the next is read
        return graph_resources.reader(self.model).file_position(self.tensor)

    def execute(self) -> torch.Tensor:
        dtype = dtype_from_name(self.dtype) if self.dtype else None
        value = graph_resources.reader(self.model).read(self.tensor, dtype=dtype)  # quantized: dequantized to dtype
        if dtype is not None and dtype != value.dtype:
            value = value.to(dtype)
        return value


class MergeExperts(Task[torch.Tensor]):
    """One block of a dense projection: sum_e w_e W_e over one layer's expert slices
    (`methods.kernel.weighted_sum`, the same kernel for every method).

    Each expert's slice is read from the checkpoint inside the task, just before it is added
    (only its bytes: one expert's rows of a fused tensor are a contiguous range, so a fused
    `gate_up_proj` is still read once between the gate and the up merge), and freed after:
    the merge holds the float32 sum and one expert, not a whole layer of experts.
    """

    model: ModelReference
    slices: tuple[ExpertSlice, ...]  # one per contributing expert
    weights: tuple[float, ...]
    dtype: str | None = None  # the experts are cast to it before the sum (None: as stored)
    device: str | None = None  # where the sum is computed (None: CPU)

    def arguments(self) -> dict[str, Task]:
        return {}

    def group_label(self) -> str | None:
        return graph_resources.reader(self.model).file_position(self.slices[0].tensor)

    def execute(self) -> torch.Tensor:
        reader = graph_resources.reader(self.model)
        dtype = dtype_from_name(self.dtype) if self.dtype else None

        # into reused buffers, the next expert read while this one is added: weighted_sum adds
        # each expert before it loads the next, in order
        with contextlib.closing(
            reader.read_many(self.slices, dtype=dtype)
        ) as pieces:  # quantized: dequantized to dtype

            def load(e: int) -> torch.Tensor:
                value = next(pieces)
                if dtype is not None and value.dtype != dtype:
                    value = value.to(dtype)
                return value.to(self.device) if self.device else value

            return weighted_sum(load, self.weights)


class JoinBlocks(Task[torch.Tensor]):
    """A projection's merged blocks, each scaled, side by side along the intermediate
    dimension, or a down bias's summed (`merge.join_blocks`)."""

    parts: tuple[Task, ...]
    scales: tuple[float, ...]
    projection: str

    def arguments(self) -> dict[str, Task]:
        return {f"part_{i}": task for i, task in enumerate(self.parts)}

    def uses_accelerator(self) -> bool:
        return self.projection != "down_bias"  # a bias's sum is small: where its parts are

    def execute(self, **kwargs) -> torch.Tensor:
        parts = [kwargs[f"part_{i}"] for i in range(len(self.parts))]
        return join_blocks(parts, self.scales, self.projection)


class PadIntermediate(Task[torch.Tensor]):
    """Zero-pad one MLP projection to `size` along its intermediate dimension.

    Exact: a zero gate/up row feeds a zero down column, which adds nothing. Lets
    layers of different widths (dense layers kept as they are, merged blocks)
    share the dense target's one `intermediate_size`.
    """

    tensor: Task
    dim: int  # 0 for gate/up [I, H], 1 for down [H, I]
    size: int

    def arguments(self) -> dict[str, Task]:
        return {"tensor": self.tensor}

    def execute(self, tensor: torch.Tensor) -> torch.Tensor:
        missing = self.size - tensor.shape[self.dim]
        if missing < 0:
            raise RuntimeError(f"cannot pad width {tensor.shape[self.dim]} down to {self.size}")
        if missing == 0:
            return tensor
        pad = [0, 0] * tensor.dim()
        pad[2 * (tensor.dim() - 1 - self.dim) + 1] = missing  # F.pad lists the last dimension first
        return torch.nn.functional.pad(tensor, pad)


class FuseExpert(Task[torch.Tensor]):
    """One tensor of a fused layout ([N, ...]) stacked from N experts' projections: each part,
    expert `experts[i]`'s projection `projections[i]`, written into its slice of the layout (the
    inverse of the layout's slices, so interleaving and transposition are the family's own).
    The dense target of GPT-OSS is its one expert (N = 1); a smaller GPT-OSS, Llama 4 or Granite
    MoE stacks its N kept or merged experts, one layer's experts at a time. Parts of other
    tensors of the layout are ignored; a slice no part fills stays zero."""

    layout: FusedLayout
    layer: int
    tensor: str  # the output tensor's name
    projections: tuple[str, ...]
    parts: tuple[Task, ...]
    experts: tuple[int, ...] = ()  # each part's expert (empty: all expert 0)
    num_experts: int = 1

    def arguments(self) -> dict[str, Task]:
        experts = self.experts or (0,) * len(self.parts)
        return {f"{e}.{p}": task for e, p, task in zip(experts, self.projections, self.parts)}

    def execute(self, **parts) -> torch.Tensor:
        dims = _fused_dims(parts, self.num_experts)
        shapes = self.layout.expert_shapes(self.layer, self.num_experts)
        dtype = next(iter(parts.values())).dtype
        out = torch.zeros([dims[d] for d in shapes[self.tensor]], dtype=dtype)
        slices = self.layout.slices(self.layer, self.num_experts, dims.get("I", 0))
        for key, value in parts.items():
            expert, projection = key.split(".", 1)
            piece = slices[int(expert)].get(projection)
            if piece is not None and piece.tensor == self.tensor:
                piece.take(out).copy_(value)
        return out


def _fused_dims(parts: Mapping[str, torch.Tensor], num_experts: int) -> dict[str, int]:
    """The layout's dimension sizes, from the parts (a concat's dense MLP is wider than an expert)."""
    dims = {"E": num_experts}
    for key, value in parts.items():
        projection = key.split(".", 1)[1]
        if projection in ("gate", "up"):
            dims["I"], dims["H"] = value.shape
        elif projection == "down":
            dims["H"], dims["I"] = value.shape
        else:
            dims["H" if projection == "down_bias" else "I"] = value.shape[0]
    if "I" in dims:
        dims["2I"] = 2 * dims["I"]
    return dims


class ZeroTensor(Task[torch.Tensor]):
    """An all-zero tensor the dense target needs (e.g. a one-expert router)."""

    name: str  # one task per output tensor: equal tasks would be saved as one shared tensor
    shape: tuple[int, ...]

    def arguments(self) -> dict[str, Task]:
        return {}

    def execute(self) -> torch.Tensor:
        return torch.zeros(self.shape)


class ComputedTensor(Task[torch.Tensor]):
    """A tensor the pipeline computed in memory (a fitted projection, a new router),
    handed to the graph without a round trip through the disk (`computed_tensors`)."""

    store: str
    name: str

    def arguments(self) -> dict[str, Task]:
        return {}

    def execute(self) -> torch.Tensor:
        return graph_resources.tensor(self.store, self.name)


@contextlib.contextmanager
def computed_tensors(tensors: Mapping[str, torch.Tensor]) -> Iterator[dict[str, ComputedTensor]]:
    """One `ComputedTensor` task per named tensor, valid inside the block."""
    with graph_resources.holding(tensors) as store:
        yield {name: ComputedTensor(store=store, name=name) for name in tensors}


class ShardWriterTask(TensorWriterTask):
    """mergekit's writer task, giving a `io.writer.ShardWriter` (safetensors written as tensors come)."""

    safe_serialization: bool = True
    header_bytes: int = DEFAULT_HEADER_BYTES

    def execute(self, **_kwargs) -> ShardWriter:
        return ShardWriter(self.out_path, max_shard_size=self.max_shard_size, header_bytes=self.header_bytes)
