# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-sequential re-fit: convert the model layer by layer on the streaming engine.

For each decoder layer l, in order (GPTQ's / llm-compressor's sequential loop):
the carried hidden states are the outputs of the *already converted* dense
layers 0..l-1; the MoE layer l runs on them while a hook records its sparse
block's input x (post-attention-norm hidden states) and output y (the target);
the dense MLP of the plan is evaluated on the same x, its down projection is
re-fitted to y (refit.py), and the dense layer l (the MoE layer with its sparse
block swapped for the fitted dense MLP) produces the next layer's inputs.
With `gate_up="regmean"` a first run over the batches gathers the Gram matrix
of the tokens routed to each expert, and every block's gate/up is the RegMean
merge of its experts instead of the plain weighted sum.
Only one layer's weights and the calibration activations are in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import tqdm

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerStream
from mergekit_moe2dense.plan import LayerPlan, assemble
from mergekit_moe2dense.refit import (
    LeastSquaresStats,
    fit_channel_scale,
    fit_down_proj,
    regmean_merge,
    squared_error,
)

__all__ = ["DenseMLP", "RefitResult", "refit_layers"]

REFIT_MODES = ("none", "scale", "down_proj")


class DenseMLP(torch.nn.Module):
    """down(act(gate x) * up x): the dense MLP that replaces a sparse block."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.gate.T) * (x @ self.up.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.intermediate(x.float()) @ self.down.T).to(x.dtype)


@dataclass
class RefitResult:
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)  # dense name -> fitted [H, I]
    # decoder layer -> (relative squared error of the sparse block's output before, after the fit),
    # sum_t ||y_t - D h_t||^2 / sum_t ||y_t||^2 on the calibration tokens
    errors: Dict[int, Tuple[float, float]] = field(default_factory=dict)


def refit_layers(
    source,
    plans: Sequence[LayerPlan],
    batches: List[TokenBatch],
    *,
    mode: str,
    damping: float,
    gate_up: str = "merge",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    spill_dir=None,
    progress: bool = True,
) -> RefitResult:
    """Fitted projections of every planned layer (down unless `mode` is none; gate and
    up with `gate_up="regmean"`), and the layers' reconstruction errors."""
    if mode not in REFIT_MODES:
        raise ValueError(f"unknown refit mode {mode!r}")
    family = source.family
    by_index = {plan.layer.index: plan for plan in plans}
    result = RefitResult()
    with LayerStream(source, batches, device=device, dtype=dtype, spill_dir=spill_dir) as stream:
        for index in tqdm.tqdm(stream.layer_indices, desc="Re-fitting", unit="layer", disable=not progress):
            layer = stream.load_layer(index)
            plan = by_index.get(index)
            if plan is not None:
                block_path = family.router_module(index).rsplit(".", 1)[0]
                sparse = stream.model.get_submodule(block_path)
                act = stream.model.get_submodule(family.experts_module(index)).act_fn
                names = family.dense_mlp_names(index)
                grams = None
                if gate_up == "regmean":
                    router = stream.model.get_submodule(family.router_module(index))
                    grams = _routed_grams(stream, layer, sparse, router, family, batches, plan.layer.num_experts)
                tensors = _dense_tensors(stream, plan, grams, damping)
                if grams is not None:
                    result.tensors.update({names[p]: tensors[p].cpu() for p in ("gate", "up")})
                dense = DenseMLP(tensors["gate"], tensors["up"], tensors["down"], act)
                down, result.errors[index] = _fit(stream, layer, sparse, dense, batches, mode, damping)
                if mode != "none":
                    result.tensors[names["down"]] = down.cpu()
                dense.down = down
                stream.model.set_submodule(block_path, dense)
                try:
                    stream.forward(layer)
                finally:
                    stream.model.set_submodule(block_path, sparse)
            else:
                stream.forward(layer)
            stream.free_layer(index)
    return result


def _fit(stream, layer, sparse, dense: DenseMLP, batches, mode: str, damping: float):
    """Run the MoE layer on the carried states, recording its block's (x, y); solve."""
    stats = LeastSquaresStats()
    keep = {}

    def hook(_module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep["mask"]].float()
        y = output.reshape(-1, output.shape[-1])[keep["mask"]].float()
        h = dense.intermediate(x)
        stats.add_batch(h, y, output=h @ dense.down.T if mode == "scale" else None)

    def before(b: int) -> None:
        keep["mask"] = batches[b].attention_mask.reshape(-1).bool().to(stream.device)

    handle = sparse.register_forward_hook(hook)
    try:
        stream.forward(layer, advance=False, before_batch=before)
    finally:
        handle.remove()
    if mode == "scale":
        down = (fit_channel_scale(stats)[:, None] * dense.down.double()).float()
    elif mode == "down_proj":
        down = fit_down_proj(stats, damping).float()
    else:
        down = dense.down
    total = max(stats.yy, 1e-30)
    return down, (squared_error(stats, dense.down) / total, squared_error(stats, down) / total)


def _routed_grams(stream, layer, sparse, router, family, batches, num_experts: int) -> List[torch.Tensor]:
    """Per expert, X_e^T X_e over the (non-padding) tokens the router sends to it."""
    grams: List[torch.Tensor] = []
    state = {}

    def take_input(_module, inputs):
        state["x"] = inputs[0].reshape(-1, inputs[0].shape[-1])[state["keep"]].double()

    def take_routing(_module, _inputs, output):
        _, _, index = family.router_outputs(output)
        index = index.reshape(state["keep"].shape[0], -1)[state["keep"]]
        x = state["x"]
        if not grams:
            grams.extend(x.new_zeros(x.shape[1], x.shape[1]) for _ in range(num_experts))
        for expert in index.unique().tolist():
            routed = x[(index == expert).any(-1)]
            grams[expert] += routed.T @ routed

    def before(b: int) -> None:
        state["keep"] = batches[b].attention_mask.reshape(-1).bool().to(stream.device)

    handles = [sparse.register_forward_pre_hook(take_input), router.register_forward_hook(take_routing)]
    try:
        stream.forward(layer, advance=False, before_batch=before)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def _dense_tensors(stream, plan: LayerPlan, grams, damping: float) -> Dict[str, torch.Tensor]:
    """The plan's dense projections on the device; gate/up by RegMean when `grams` are given."""
    load = lambda piece: stream.read_slice(piece).to(stream.device)  # noqa: E731
    tensors = assemble(plan, load)
    if grams is not None:
        for projection in ("gate", "up"):
            tensors[projection] = _regmean_projection(plan, projection, grams, load, damping)
    return tensors


def _regmean_projection(plan: LayerPlan, projection: str, grams, load, damping: float) -> torch.Tensor:
    """A block's gate or up projection as the RegMean merge of its experts, blocks concatenated."""
    parts = []
    for block in plan.blocks:
        if block.shared is not None:
            parts.append(load(plan.layer.shared_experts[block.shared][projection]).float())
            continue
        projections = [load(expert[projection]) if w != 0.0 else None for w, expert in zip(block.weights, plan.layer.experts)]
        parts.append(regmean_merge(block.weights, projections, grams, damping).float())
    return torch.cat(parts, dim=0)
