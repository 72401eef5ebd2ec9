# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge as a mergekit task graph: LoadTensor -> MergeExperts -> SaveTensor -> FinalizeModel.

mergekit's planner assumes one architecture in and out, and its kernels see the
same tensor from several models. Here the inputs are several tensors (experts)
of one model, so we plan the graph ourselves and reuse mergekit's tasks and
executor: tensors load lazily, equal LoadTensor tasks are shared (a fused
`gate_up_proj` is read once for both projections), and values are freed after
their last use, which keeps memory near one layer's experts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import FinalizeModel, LoadTensor, SaveTensor, TensorWriterTask
from mergekit.merge_methods.base import TensorGroup

from mergekit_moe2dense.families import PROJECTIONS, ExpertSlice, MoEFamily, MoELayer


class MergeExperts(Task[torch.Tensor]):
    """One dense projection: the method's kernel over one layer's expert slices."""

    method: str
    sources: Tuple[LoadTensor, ...]  # distinct checkpoint tensors
    slices: Tuple[ExpertSlice, ...]  # one per contributing expert
    expert_ids: Tuple[int, ...]
    weights: Tuple[float, ...]

    def arguments(self) -> Dict[str, Task]:
        return {f"source_{i}": task for i, task in enumerate(self.sources)}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> Optional[str]:
        return self.sources[0].group_label()

    def execute(self, **kwargs) -> torch.Tensor:
        from mergekit_moe2dense.methods import get_method

        by_name = {task.tensor: kwargs[f"source_{i}"] for i, task in enumerate(self.sources)}
        tensors = [piece.take(by_name[piece.tensor]) for piece in self.slices]
        group = TensorGroup.from_tensors(tensors, ids=self.expert_ids)
        (merged,) = get_method(self.method)(
            [group], parameters={"expert_weight": dict(zip(self.expert_ids, self.weights))}
        )
        return merged


def merge_experts_task(
    model: ModelReference,
    method: str,
    layer: MoELayer,
    projection: str,
    weights: Sequence[float],
    dtype: Optional[str] = None,
) -> MergeExperts:
    """Experts with zero weight are left out, so e.g. `single_expert` reads one expert."""
    used = [e for e, w in enumerate(weights) if w != 0.0]
    slices = tuple(layer.experts[e][projection] for e in used)
    names = sorted({piece.tensor for piece in slices})
    return MergeExperts(
        method=method,
        sources=tuple(LoadTensor(model=model, tensor=name, dtype=dtype) for name in names),
        slices=slices,
        expert_ids=tuple(used),
        weights=tuple(float(weights[e]) for e in used),
    )


def plan_dense_merge(
    *,
    model: ModelReference,
    family: MoEFamily,
    tensor_names: Sequence[str],
    layers: Sequence[MoELayer],
    layer_weights: torch.Tensor,
    method: str,
    out_path: str,
    out_dtype: Optional[str],
    dtype: Optional[str],
    max_shard_size: int,
    safe_serialization: bool = True,
) -> List[Task]:
    """Tasks that write the dense checkpoint: merged MLPs, everything else copied."""
    writer = TensorWriterTask(
        out_path=out_path, max_shard_size=max_shard_size, safe_serialization=safe_serialization
    )
    saves = []
    consumed = set()
    for layer, weights in zip(layers, layer_weights.tolist()):
        consumed.update(layer.consumed)
        names = family.dense_mlp_names(layer.index)
        for projection in PROJECTIONS:
            merged = merge_experts_task(model, method, layer, projection, weights, dtype)
            saves.append(_save(names[projection], merged, writer, out_dtype))
    for name in tensor_names:
        if name not in consumed:
            saves.append(_save(name, LoadTensor(model=model, tensor=name, dtype=dtype), writer, out_dtype))
    return [FinalizeModel(tensor_save_tasks=tuple(saves), writer_task=writer)]


def _save(name: str, task: Task, writer: TensorWriterTask, out_dtype: Optional[str]) -> SaveTensor:
    return SaveTensor(tensor_name=name, tensor_task=task, writer_task=writer, clone=False, dtype=out_dtype)
