# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Plan -> task graph: the tasks that write a dense model (`plan_dense_merge`; k dense models
are k of them) and a smaller MoE of the same family (`plan_moe_merge`: k merged experts, or
N kept or merged ones).

Every builder merges a projection as `merge.py` defines it (`projection_task`: one
`MergeExperts` per block of `merge.merge_terms`, joined by `merge.join_blocks`) and ends with
the same copy of everything the conversion does not build (`rest_of_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from mergekit.common import ModelReference
from mergekit.graph import Task

from mergekit_moe2dense.families import PROJECTIONS, MoELayer
from mergekit_moe2dense.graph.quantized import (
    copied_tensor,
    quantized_expert,
    quantized_stack,
    quantized_weights,
    source_formats,
)
from mergekit_moe2dense.graph.tasks import FuseExpert, JoinBlocks, MergeExperts, PadIntermediate, ZeroTensor
from mergekit_moe2dense.graph.tensor_io import TensorIO
from mergekit_moe2dense.io.quantize import QuantizedFormat
from mergekit_moe2dense.merge import merge_terms
from mergekit_moe2dense.plan import Block, LayerPlan
from mergekit_moe2dense.refit import BIASES

__all__ = ["expert_key", "plan_dense_merge", "plan_moe_merge", "projection_task", "rest_of_checkpoint"]


def projection_task(
    model: ModelReference, plan: LayerPlan, projection: str, dtype: str | None, device: str | None = None
) -> Task:
    """One dense projection of a layer: its blocks merged, scaled and concatenated. An
    expert bias (`gate_bias`, ...) merges as its weight does: a merged expert's bias is
    the same weighted sum; down biases of several blocks add up, each scaled as its block.
    Experts with zero weight are left out, so e.g. `single_expert` reads one expert."""
    terms = merge_terms(plan, projection)
    parts = tuple(
        MergeExperts(model=model, slices=t.slices, weights=t.weights, dtype=dtype, device=device) for t in terms
    )
    scales = tuple(t.scale for t in terms)
    if len(parts) == 1 and scales[0] == 1.0:
        return parts[0]
    return JoinBlocks(parts=parts, scales=scales, projection=projection)


def rest_of_checkpoint(io: TensorIO, source, consumed: set[str], replaced: dict[str, Task] | None = None, formats=None):
    """(name, task) for every source tensor the conversion does not build: read and written as it
    is, or from `replaced` (a dense layer's padded MLP); one of `formats` (`quantized.source_formats`)
    as its stored data and scales. `SourceModel.rest_of_checkpoint` leaves out the layers no output
    holds (multi-token prediction)."""
    replaced, formats = replaced or {}, formats or {}
    outputs = []
    for name in source.rest_of_checkpoint(consumed):
        if name in replaced:
            outputs.append((name, replaced[name]))
        else:
            outputs += copied_tensor(source, name, name, formats, io.read)
    return outputs


def plan_dense_merge(
    io: TensorIO,
    source,
    plans: Sequence[LayerPlan],
    out_path: str,
    *,
    width: int | None = None,
    fitted: dict[str, Task] | None = None,
    quantized: Collection[str] = (),
) -> list[Task]:
    """Tasks that write the dense checkpoint of `source` (a `io.source.SourceModel`):
    merged MLPs, everything else copied.

    With `width`, every merged MLP and the MLPs of the decoder layers that are dense
    already are zero-padded to that intermediate size. Projections a plan lists in
    `fitted` come from the `fitted` tasks (by dense tensor name) instead of a merge.
    The tensors named in `quantized` (`output_quantization: fp8`, outputs/fp8.py) are written in
    block-wise FP8 with a scale per `io.fp8_block`, quantized from their value in `io.out_dtype`.
    """
    outputs, consumed = [], set()
    for plan in plans:
        consumed.update(plan.layer.consumed)
        outputs += _dense_layer(io, source, plan, width, fitted)
    outputs += rest_of_checkpoint(io, source, consumed, _padded_dense_layers(io, source, plans, width))
    if quantized:
        outputs = quantized_weights(outputs, quantized, QuantizedFormat("fp8", io.fp8_block), io.out_dtype)
    return [io.write_all(out_path, outputs)]


def _padded_dense_layers(io: TensorIO, source, plans: Sequence[LayerPlan], width: int | None) -> dict[str, Task]:
    """The MLPs of the decoder layers that are dense already, padded to `width` (none without it)."""
    family, config = source.family, source.config
    padded = {}
    converted = {plan.layer.index for plan in plans}
    if width is not None and family.dense_layer_width(config) is not None:
        for layer in range(config.num_hidden_layers):
            if layer not in converted:
                for projection, name in family.dense_mlp_names(layer).items():
                    padded[name] = _padded(io.read(name), projection, width)
    return padded


def _dense_layer(io: TensorIO, source, plan: LayerPlan, width: int | None, fitted) -> list[tuple[str, Task]]:
    """(name, task) of one converted layer's dense MLP (its fused tensors, where the dense target
    stacks them) and the zero tensors the dense target needs there."""
    family, index = source.family, plan.layer.index
    names = family.dense_mlp_names(index, PROJECTIONS + BIASES)  # biases: where the target has them
    tasks = {}
    for projection in PROJECTIONS + tuple(b for b in BIASES if b in plan.layer.experts[0]):
        if projection in plan.fitted:
            task = fitted[names[projection]]
        else:
            task = projection_task(io.model, plan, projection, io.dtype, io.device)
        tasks[projection] = _padded(task, projection, width)
    fused = family.dense.fused
    if fused is None:
        outputs = [(names[projection], tasks[projection]) for projection in PROJECTIONS]
    else:
        outputs = [
            (
                name,
                FuseExpert(
                    layout=fused, layer=index, tensor=name, projections=tuple(tasks), parts=tuple(tasks.values())
                ),
            )
            for name in fused.expert_shapes(index, 1)
        ]
    for name, shape in family.dense_zero_tensors(source.config, index).items():
        outputs.append((name, ZeroTensor(name=name, shape=tuple(shape))))
    return outputs


def _padded(task: Task, projection: str, width: int | None) -> Task:
    if width is None or projection == "down_bias":  # [H]: no intermediate dimension
        return task
    return PadIntermediate(tensor=task, dim=1 if projection == "down" else 0, size=width)


def expert_key(layer: int, expert: int, projection: str) -> str:
    """The key of a re-fitted projection of the smaller MoE's expert (`plan_moe_merge`'s `fitted`),
    whatever layout the expert is written in."""
    return f"layer {layer} expert {expert} {projection}"


def plan_moe_merge(
    io: TensorIO,
    source,
    layers: Sequence[MoELayer],
    weights: torch.Tensor,
    rows: dict[str, Task],
    out_path: str,
    *,
    fitted: dict[str, Task] | None = None,
    quantized: Collection[str] = (),
) -> list[Task]:
    """Tasks that write the k-expert MoE: merged experts, the new expert-indexed tensors, the
    rest copied (shared experts and their gates included; `rest_of_checkpoint`).

    `weights` [k, L, E]; `layers` are the source's MoE layers, or the same with permuted
    expert slices (alignment.py); `rows` holds a task for every expert-indexed tensor of
    every block (`reassemble.closed_form_rows`), by output name; `fitted` re-fitted expert
    projections by `expert_key`, used instead of their merge. Each expert is written in the
    family's `moe_layout`: its own tensors, or its slices of fused [k, ...] tensors, each stacked
    from the layer's k experts by one task (`FuseExpert`: memory stays one layer's experts).
    With `io.quantization` `source`, what the source stores quantized is written in its format
    (graph/quantized.py): kept experts and copied tensors as stored, merged or fitted ones quantized;
    with `fp8`, the tensors named in `quantized` (outputs/fp8.py) as `plan_dense_merge` writes them.
    """
    formats = source_formats(source) if io.quantization == "source" else {}
    outputs, consumed = [], set()
    for position, layer in enumerate(layers):
        consumed.update(layer.consumed)
        outputs += _moe_layer(io, source, layer, weights[:, position], fitted or {}, formats)
        for name, output, axis in source.family.moe_block_tensors(source.config, layer.index, source.tensor_names):
            if axis is not None:
                outputs.append((output, rows[output]))
            else:
                outputs += copied_tensor(source, name, output, formats, io.read)
    outputs += rest_of_checkpoint(io, source, consumed, formats=formats)
    if quantized:
        outputs = quantized_weights(outputs, quantized, QuantizedFormat("fp8", io.fp8_block), io.out_dtype)
    return [io.write_all(out_path, outputs)]


def _kept_expert(layer: MoELayer, row: Sequence[float], projection: str) -> int | None:
    """The source expert a new expert's `projection` is, unchanged (weight one, no permutation), if any."""
    used = [e for e, w in enumerate(row) if w != 0.0]
    if len(used) == 1 and row[used[0]] == 1.0 and layer.experts[used[0]][projection].units is None:
        return used[0]
    return None


def _moe_layer(io: TensorIO, source, layer: MoELayer, weights: torch.Tensor, fitted, formats) -> list[tuple[str, Task]]:
    """(name, task) of one layer's k experts: tensors of their own first, then the fused ones."""
    family, num_experts = source.family, weights.shape[0]
    outputs = family.moe_expert_slices(layer.index, num_experts, family.expert_width(source.config))
    own, stacked = [], {}
    for expert, row in enumerate(weights.tolist()):
        plan = LayerPlan(layer, (Block(tuple(row)),))
        for projection, piece in outputs[expert].items():
            task = fitted.get(expert_key(layer.index, expert, projection))
            kept = _kept_expert(layer, row, projection) if task is None else None
            task = task or projection_task(io.model, plan, projection, io.dtype, io.device)
            origin = layer.experts[0 if kept is None else kept][projection]
            if piece.expert is None:  # a tensor of its own
                own += quantized_expert(source, piece.tensor, task, origin, kept is not None, formats)
            else:
                stacked.setdefault(piece.tensor, []).append((expert, projection, task, kept, origin.tensor))
    for name, parts in stacked.items():
        own += _fused(source, layer, name, parts, num_experts, formats)
    return own


def _fused(source, layer: MoELayer, name: str, parts, num_experts: int, formats) -> list[tuple[str, Task]]:
    """One fused tensor of the layer's k experts: stacked by `FuseExpert`, or, where the source
    stores it quantized, each expert's slice copied or quantized (`quantized.quantized_stack`)."""
    experts, projections, tasks, kept, origins = zip(*parts)
    layout, family = source.family.moe_layout(), source.family

    def fuse(positions, count: int, numbered: bool) -> FuseExpert:
        return FuseExpert(
            layout=layout,
            layer=layer.index,
            tensor=name,
            projections=tuple(projections[i] for i in positions),
            parts=tuple(tasks[i] for i in positions),
            experts=tuple(experts[i] if numbered else 0 for i in positions),
            num_experts=count,
        )

    if origins[0] not in formats:
        return [(name, fuse(range(len(parts)), num_experts, True))]
    same_layout = family.layout_of(layer.index, source.tensor_names) == layout
    per_expert = []
    for expert in range(num_experts):
        positions = [i for i, e in enumerate(experts) if e == expert]
        copies = {kept[i] for i in positions}
        # a source expert's bytes only where this slice of the layout is that whole expert, unchanged
        whole = same_layout and len(copies) == 1 and None not in copies and all(origins[i] == name for i in positions)
        per_expert.append((fuse(positions, 1, False), copies.pop() if whole else None))
    return quantized_stack(source, name, per_expert, origins[0], formats)
