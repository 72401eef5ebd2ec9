# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge as a mergekit task graph: ReadTensor -> MergeExperts -> SaveTensor -> FinalizeModel.

Each layer's dense MLP is described by a `LayerPlan` (see plan.py).
mergekit's planner assumes one architecture in and out, and its kernels see the
same tensor from several models. Here the inputs are several tensors (experts)
of one model, so we plan the graph ourselves and reuse mergekit's tasks and
executor: tensors load lazily, equal read tasks are shared (a fused
`gate_up_proj` is read once for both projections), and values are freed after
their last use. Reads are scheduled in the checkpoint's file order (`ReadTensor.group_label`),
and the output is written tensor by tensor as it is produced (`io.writer.ShardWriter`), so memory
stays near one layer's experts whatever the number of layers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor, Task
from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask
from safetensors.torch import load_file, save_file

from mergekit_moe2dense.families import PROJECTIONS, ExpertSlice
from mergekit_moe2dense.families.spec import FusedLayout
from mergekit_moe2dense.io.index import read_index
from mergekit_moe2dense.io.reader import READAHEAD_BYTES, TensorReader
from mergekit_moe2dense.io.writer import DEFAULT_HEADER_BYTES, ShardWriter, abort_open_writers, header_bytes_for
from mergekit_moe2dense.methods.kernel import weighted_sum
from mergekit_moe2dense.plan import LayerPlan
from mergekit_moe2dense.refit import BIASES


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
        return open_readers.get(self.model).file_position(self.tensor)

    def execute(self) -> torch.Tensor:
        dtype = dtype_from_name(self.dtype) if self.dtype else None
        value = open_readers.get(self.model).read(self.tensor, dtype=dtype)  # quantized: dequantized to dtype
        if dtype is not None and dtype != value.dtype:
            value = value.to(dtype)
        return value


class _OpenReaders:
    """One direct-reading `TensorReader` per source model while a graph runs (mergekit's
    `LoaderCache` plays this part for `LoadTensor`); `close_all` when the run ends."""

    def __init__(self):
        self._readers: dict[str, TensorReader] = {}
        self._lock = threading.Lock()

    def get(self, model: ModelReference) -> TensorReader:
        path = model.local_path()
        with self._lock:
            if path not in self._readers:
                self._readers[path] = TensorReader(read_index(path), readahead=READAHEAD_BYTES, direct=True)
            return self._readers[path]

    def close_all(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()


open_readers = _OpenReaders()


class MergeExperts(Task[torch.Tensor]):
    """One dense projection: sum_e w_e W_e over one layer's expert slices
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
        return open_readers.get(self.model).file_position(self.slices[0].tensor)

    def execute(self) -> torch.Tensor:
        reader = open_readers.get(self.model)
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


class ConcatBlocks(Task[torch.Tensor]):
    """Blocks side by side along the intermediate dimension, each scaled."""

    parts: tuple[Task, ...]
    dim: int  # 0 for gate/up [I, H], 1 for down [H, I]
    scales: tuple[float, ...]

    def arguments(self) -> dict[str, Task]:
        return {f"part_{i}": task for i, task in enumerate(self.parts)}

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, **kwargs) -> torch.Tensor:
        parts = [kwargs[f"part_{i}"] for i in range(len(self.parts))]
        return torch.cat(
            [part * scale if scale != 1.0 else part for part, scale in zip(parts, self.scales)], dim=self.dim
        )


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


class SumBlocks(Task[torch.Tensor]):
    """Blocks' down-projection biases, each scaled, summed (each block adds its output)."""

    parts: tuple[Task, ...]
    scales: tuple[float, ...]

    def arguments(self) -> dict[str, Task]:
        return {f"part_{i}": task for i, task in enumerate(self.parts)}

    def execute(self, **kwargs) -> torch.Tensor:
        return sum(kwargs[f"part_{i}"] * scale for i, scale in enumerate(self.scales))


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
        dims = {"E": self.num_experts}
        for key, value in parts.items():  # the widths from the parts (a concat's dense MLP is wider)
            projection = key.split(".", 1)[1]
            if projection in ("gate", "up"):
                dims["I"], dims["H"] = value.shape
            elif projection == "down":
                dims["H"], dims["I"] = value.shape
            else:
                dims["H" if projection == "down_bias" else "I"] = value.shape[0]
        if "I" in dims:
            dims["2I"] = 2 * dims["I"]
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


class ZeroTensor(Task[torch.Tensor]):
    """An all-zero tensor the dense target needs (e.g. a one-expert router)."""

    name: str  # one task per output tensor: equal tasks would be saved as one shared tensor
    shape: tuple[int, ...]

    def arguments(self) -> dict[str, Task]:
        return {}

    def execute(self) -> torch.Tensor:
        return torch.zeros(self.shape)


def merge_experts_task(
    model: ModelReference,
    slices: Sequence[ExpertSlice],
    weights: Sequence[float],
    dtype: str | None = None,
    device: str | None = None,
) -> MergeExperts:
    """Experts with zero weight are left out, so e.g. `single_expert` reads one expert."""
    used = [e for e, w in enumerate(weights) if w != 0.0]
    return MergeExperts(
        model=model,
        slices=tuple(slices[e] for e in used),
        weights=tuple(float(weights[e]) for e in used),
        dtype=dtype,
        device=device,
    )


def block_scale(block, projection: str) -> float:
    """A block's factor on one projection: `down_scale` on its output (down and its bias),
    `input_scale` on its input (gate and up rows; not their biases)."""
    if projection in ("down", "down_bias"):
        return block.down_scale
    return block.input_scale if projection in ("gate", "up") else 1.0


def projection_task(
    model: ModelReference, plan: LayerPlan, projection: str, dtype: str | None, device: str | None = None
) -> Task:
    """One dense projection of a layer: its blocks merged, scaled and concatenated. An
    expert bias (`gate_bias`, ...) merges as its weight does: a merged expert's bias is
    the same weighted sum; down biases of several blocks add up, each scaled as its block."""
    parts, scales = [], []
    if projection in BIASES and any(block.shared is not None for block in plan.blocks):
        raise ValueError("expert biases with shared experts are not supported")
    for block in plan.blocks:
        if block.shared is not None:
            slices, weights = [plan.layer.shared_experts[block.shared][projection]], [1.0]
        else:
            slices, weights = [expert[projection] for expert in plan.layer.experts], block.weights
        parts.append(merge_experts_task(model, slices, weights, dtype, device))
        scales.append(block_scale(block, projection))
    if len(parts) == 1 and scales[0] == 1.0:
        return parts[0]
    if projection == "down_bias":
        return SumBlocks(parts=tuple(parts), scales=tuple(scales))
    return ConcatBlocks(parts=tuple(parts), dim=1 if projection == "down" else 0, scales=tuple(scales))


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

    @classmethod
    def from_options(cls, model: ModelReference, dtype, out_dtype, options) -> TensorIO:
        return cls(
            model=model,
            dtype=dtype,
            out_dtype=out_dtype,
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
        return SaveTensor(
            tensor_name=name, tensor_task=task, writer_task=writer, clone=self.clone_tensors, dtype=self.out_dtype
        )


class ShardWriterTask(TensorWriterTask):
    """mergekit's writer task, giving a `io.writer.ShardWriter` (safetensors written as tensors come)."""

    safe_serialization: bool = True
    header_bytes: int = DEFAULT_HEADER_BYTES

    def execute(self, **_kwargs) -> ShardWriter:
        return ShardWriter(self.out_path, max_shard_size=self.max_shard_size, header_bytes=self.header_bytes)


class ComputedTensor(Task[torch.Tensor]):
    """A tensor the pipeline computed in memory (a fitted projection, a new router),
    handed to the graph without a round trip through the disk (`computed_tensors`)."""

    store: str
    name: str

    def arguments(self) -> dict[str, Task]:
        return {}

    def execute(self) -> torch.Tensor:
        return _STORES[self.store][self.name]


_STORES: dict[str, dict[str, torch.Tensor]] = {}


class SpilledTensors(MutableMapping):
    """A {name: tensor} mapping that holds at most `keep_bytes` in memory: past that, each tensor
    set is written at once to its own safetensors file under `directory` (created then) and read
    back when looked up. The re-fit's fitted projections go here, so a conversion does not hold one
    per layer in memory (2.4 GB of float32 for 164 layers of the 30 GB benchmark), while a small
    model's stay in memory, handed to the graph without a round trip through the disk."""

    # small: at the re-fit's peak (its last layers) 64 MB held here were 64 MB over its target
    # (1.05 against 0.98 GB on the 4 GB benchmark; docs/benchmarks.md), while a test-sized model's
    # fitted tensors all stay in memory
    KEEP_BYTES = 8 << 20

    def __init__(self, directory: str, keep_bytes: int | None = None):
        self.directory = directory
        self.keep_bytes = self.KEEP_BYTES if keep_bytes is None else keep_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        if name in self:
            del self[name]
        tensor = tensor.detach().cpu().contiguous()
        held = sum(t.numel() * t.element_size() for t in self._held.values())
        if held + tensor.numel() * tensor.element_size() <= self.keep_bytes:
            self._held[name] = tensor
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{len(self._files):06d}-{uuid.uuid4().hex[:8]}.safetensors")
        save_file({"tensor": tensor}, path)
        self._files[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        return load_file(self._files[name])["tensor"]

    def __delitem__(self, name: str) -> None:
        if self._held.pop(name, None) is None:
            os.remove(self._files.pop(name))

    def __iter__(self):
        return iter([*self._held, *self._files])

    def __len__(self) -> int:
        return len(self._held) + len(self._files)

    def __contains__(self, name) -> bool:
        return name in self._held or name in self._files


@contextlib.contextmanager
def computed_tensors(tensors: Mapping[str, torch.Tensor]) -> Iterator[dict[str, ComputedTensor]]:
    """One `ComputedTensor` task per named tensor, valid inside the block."""
    store = uuid.uuid4().hex
    _STORES[store] = tensors
    try:
        yield {name: ComputedTensor(store=store, name=name) for name in tensors}
    finally:
        del _STORES[store]


def plan_dense_merge(
    io: TensorIO,
    source,
    plans: Sequence[LayerPlan],
    out_path: str,
    *,
    width: int | None = None,
    fitted: dict[str, Task] | None = None,
) -> list[Task]:
    """Tasks that write the dense checkpoint of `source` (a `io.source.SourceModel`):
    merged MLPs, everything else copied.

    With `width`, every merged MLP and the MLPs of the decoder layers that are dense
    already are zero-padded to that intermediate size. Projections a plan lists in
    `fitted` come from the `fitted` tasks (by dense tensor name) instead of a merge.
    """
    family, config = source.family, source.config
    outputs, consumed, padded = [], set(), {}
    converted = {plan.layer.index for plan in plans}
    if width is not None and family.dense_layer_width(config) is not None:
        for layer in range(config.num_hidden_layers):
            if layer not in converted:
                for projection, name in family.dense_mlp_names(layer).items():
                    padded[name] = _padded(io.read(name), projection, width)
    for plan in plans:
        consumed.update(plan.layer.consumed)
        names = family.dense_mlp_names(plan.layer.index, PROJECTIONS + BIASES)  # biases: where the target has them
        tasks = {}
        for projection in PROJECTIONS + tuple(b for b in BIASES if b in plan.layer.experts[0]):
            if projection in plan.fitted:
                task = fitted[names[projection]]
            else:
                task = projection_task(io.model, plan, projection, io.dtype, io.device)
            tasks[projection] = _padded(task, projection, width)
        fused = family.dense.fused
        if fused is None:
            outputs += [(names[projection], tasks[projection]) for projection in PROJECTIONS]
        for name in fused.expert_shapes(plan.layer.index, 1) if fused is not None else ():
            task = FuseExpert(
                layout=fused, layer=plan.layer.index, tensor=name, projections=tuple(tasks), parts=tuple(tasks.values())
            )
            outputs.append((name, task))
        for name, shape in family.dense_zero_tensors(config, plan.layer.index).items():
            outputs.append((name, ZeroTensor(name=name, shape=tuple(shape))))
    for name in source.rest_of_checkpoint(consumed):
        outputs.append((name, padded.get(name) or io.read(name)))
    return [io.write_all(out_path, outputs)]


def _padded(task: Task, projection: str, width: int | None) -> Task:
    if width is None or projection == "down_bias":  # [H]: no intermediate dimension
        return task
    return PadIntermediate(tensor=task, dim=1 if projection == "down" else 0, size=width)


def run_graph(targets: list[Task], options, desc: str = "Merging experts") -> None:
    """Execute the write graph with mergekit's executor; the run's readers are closed after."""
    device = options.device or "cpu"
    try:
        executor = Executor(
            targets=targets, math_device=device, storage_device=device if options.low_cpu_memory else "cpu"
        )
        with _lean_merge(device):
            for _ in executor.run(quiet=options.quiet, desc=desc):
                pass
    finally:
        open_readers.close_all()
        abort_open_writers()


@contextlib.contextmanager
def _lean_merge(device: str) -> Iterator[None]:
    """The merge's own CPU costs, kept below the disk's (docs/benchmarks.md, "Merge"):
    - the cyclic garbage collector is frozen on what exists (the imported libraries): each of
      its passes walked those objects again, ~10% of a merge's CPU time;
    - on the CPU, torch's intra-op threads leave two cores to the reader and writer
      threads: the merge's elementwise kernels are memory-bound, and intra-op threads that
      wait for a core taken by those made each add several times slower (8 GB merge on 2 cores,
      31.0 s with 2 threads, 23.3 s with 1)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, threads - 2))
    freeze = gc.get_freeze_count() == 0  # the command line froze them already
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
        torch.set_num_threads(threads)
