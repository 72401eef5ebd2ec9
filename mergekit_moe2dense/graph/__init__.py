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

- tasks.py: the Task classes;
- quantized.py: the tasks and pieces of a quantized output (`output_quantization: source`: stored
  bytes copied, computed tensors quantized; `fp8`: the output's linear weights and experts quantized);
- tensor_io.py: `TensorIO`, how a graph reads and writes;
- builders.py: plan -> task graph (a dense model, a smaller MoE), sharing one copy of the rest;
- runner.py: running a graph, and closing its readers after;
- resources.py: the readers and in-memory tensors the tasks look up while a graph runs;
- spill.py: `SpilledTensors`, the re-fit's fitted tensors kept on disk past a few MB.
"""

from mergekit_moe2dense.graph.builders import (
    expert_key,
    plan_dense_merge,
    plan_moe_merge,
    projection_task,
    rest_of_checkpoint,
)
from mergekit_moe2dense.graph.runner import run_graph
from mergekit_moe2dense.graph.spill import SpilledTensors
from mergekit_moe2dense.graph.tasks import (
    ComputedTensor,
    FuseExpert,
    JoinBlocks,
    MergeExperts,
    PadIntermediate,
    ReadTensor,
    ZeroTensor,
    computed_tensors,
)
from mergekit_moe2dense.graph.tensor_io import TensorIO

__all__ = [
    "ComputedTensor",
    "FuseExpert",
    "JoinBlocks",
    "MergeExperts",
    "PadIntermediate",
    "ReadTensor",
    "SpilledTensors",
    "TensorIO",
    "ZeroTensor",
    "computed_tensors",
    "expert_key",
    "plan_dense_merge",
    "plan_moe_merge",
    "projection_task",
    "rest_of_checkpoint",
    "run_graph",
]
