# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-sequential re-fit of a smaller MoE: every new expert's down projection, the
whole MoE block fitted at once (`prune_experts`, `merge_experts` with `refit: down_proj`).

On the layer loop (`LayerStream.run`), for each MoE layer l in order: the carried states
are the outputs of the already pruned layers 0..l-1. The smaller block (N experts: each
a kept expert or a group's merge, with its new router rows, shared experts as they are)
is built from the smaller config's own module class; the original layer runs on the
carried states while a hook records its block's input x and output y. With the smaller
block's routing g_tj (its own router on x) and its experts' activations
h_j(x) = act(G_j x) * (U_j x), its output is

    y'(x) = s(x) + sum_j g_tj D_j h_j(x),      s(x): the shared experts (and their gate)

which is linear in D = [D_1 ... D_N] [H, N x I]: with z_t = [g_t1 h_1(x_t), ..., g_tN h_N(x_t)]
the ridge solution of sum_t ||(y_t - s(x_t)) - D z_t||^2 (refit.py) makes the smaller
block's output match the original block's on the calibration tokens, routing included.
The fitted block replaces the original one for the following layers. The Gram matrix is
(N x I)^2 float64: 4 x 14336 experts of Mixtral would need 26 GB, so large experts need
fewer kept experts per fit than this simple joint solve handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers

from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerVisitor
from mergekit_moe2dense.calibration.sequential import SparseBlock
from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.refit import LeastSquaresStats, fit_down_proj, squared_error

__all__ = ["SmallerMoEFit", "fit_smaller_moe"]

EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class SmallerMoEFit:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # output name -> fitted down [H, I]
    errors: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> relative error before, after


class _Pruning(LayerVisitor):
    def __init__(self, skeleton, layers: dict[int, tuple[int, MoELayer]], weights, damping, result):
        self.skeleton = skeleton
        self.layers = layers
        self.weights = weights  # [N, L, E]
        self.damping = damping
        self.result = result
        self.current = None

    def prepare_layer(self, stream, index, layer):
        if index not in self.layers:
            return {}
        position, moe = self.layers[index]
        block = SparseBlock.of(stream, index, layer)
        new = self.skeleton.get_submodule(block.path)
        _fill(new, block, moe, self.weights[:, position])
        self.current = new
        self._fit(stream, block, new, index)
        return {block.path: new}

    def after_layer(self, stream, index):
        if self.current is not None:
            self.current.to_empty(device="meta")
            self.current = None

    def _fit(self, stream, block: SparseBlock, new: torch.nn.Module, index: int) -> None:
        family = stream.family
        router = new.get_submodule(family.router_module(index)[len(block.path) + 1 :])
        experts = new.experts
        num, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
        old_down = torch.cat([experts.down_proj[j].float() for j in range(num)], dim=1)  # [H, N*I]
        stats = LeastSquaresStats()

        def add(x: torch.Tensor, y: torch.Tensor) -> None:
            dtype = experts.down_proj.dtype
            _, weights, index_ = family.router_outputs(router(x.to(dtype)))
            features = x.new_zeros(x.shape[0], num * width)
            for j in range(num):
                token, slot = (index_ == j).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                gate, up = torch.nn.functional.linear(x[token].to(dtype), experts.gate_up_proj[j]).chunk(2, dim=-1)
                hidden = (experts.act_fn(gate) * up).float()
                features[token, j * width : (j + 1) * width] = weights[token, slot].float()[:, None] * hidden
            out = new(x.to(dtype)[None])
            out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape).float()
            # the smaller block's residual y - y'(x) = (y - s(x)) - D_old z, s = out - D_old z
            stats.add_batch(features, y - out)
            energy[0] += float(((y - out + features @ old_down.T) ** 2).sum())

        energy = [0.0]
        block.record(add)
        # ridge on the change D - D_old: an expert no calibration token reaches keeps its D
        change = fit_down_proj(stats, self.damping)
        down = (old_down.double() + change.to(old_down.device)).float()
        total = max(energy[0], 1e-30)
        self.result.errors[index] = (stats.yy / total, squared_error(stats, change) / total)
        with torch.no_grad():
            for j in range(num):
                fitted = down[:, j * width : (j + 1) * width]
                experts.down_proj[j] = fitted.to(experts.down_proj.dtype)
                self.result.tensors[family.moe_expert_names(index, j)["down"]] = fitted.cpu()


def _fill(new: torch.nn.Module, block: SparseBlock, moe: MoELayer, weights: torch.Tensor) -> None:
    """The smaller block's tensors: merged experts, expert-indexed rows mixed (`weights` [N, E]),
    everything else (shared experts, their gate) the original block's."""
    device = block.stream.device
    new.to_empty(device=device)
    original = dict(block.module.state_dict())
    rows = weights.to(device=device, dtype=torch.float64)
    with torch.no_grad():
        targets = dict(new.named_parameters())
        targets.update(dict(new.named_buffers()))
        for name, target in targets.items():
            if name in EXPERT_TENSORS:
                continue
            value = original[name]
            if value.shape != target.shape:  # indexed by expert: the new experts' mix of rows
                value = (rows @ value.double().reshape(value.shape[0], -1)).reshape(target.shape)
            target.copy_(value.to(target.dtype))
        for j, row in enumerate(weights.tolist()):
            merged = {
                p: sum(w * block.load(moe.experts[e][p]).float() for e, w in enumerate(row) if w != 0.0)
                for p in ("gate", "up", "down")
            }
            new.experts.gate_up_proj[j] = torch.cat([merged["gate"], merged["up"]]).to(new.experts.gate_up_proj.dtype)
            new.experts.down_proj[j] = merged["down"].to(new.experts.down_proj.dtype)


def fit_smaller_moe(
    source,
    config: transformers.PretrainedConfig,
    layers: list[MoELayer],
    weights: torch.Tensor,
    batches,
    *,
    damping: float,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    spill_dir=None,
    progress: bool = True,
) -> SmallerMoEFit:
    """Fitted down projections of every new expert of the smaller MoE `config` (N experts,
    `weights` [N, L, E] over `layers`, whose slices may be aligned), layer by layer."""
    result = SmallerMoEFit()
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    by_index = {layer.index: (position, layer) for position, layer in enumerate(layers)}
    with LayerStream(source, batches, device=device, dtype=dtype, spill_dir=spill_dir) as stream:
        stream.run(_Pruning(skeleton, by_index, weights, damping, result), desc="Re-fitting", progress=progress)
    return result
