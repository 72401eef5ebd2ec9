# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-sequential re-fit of a smaller MoE: every new expert's down projection, the
whole MoE block fitted at once (`prune_experts`, `merge_experts` with `refit: down_proj`).

On the layer loop (`LayerStream.run`), for each MoE layer l in order: the carried states
are the outputs of the already pruned layers 0..l-1. The smaller block (N experts: each
a kept expert or a group's merge, with its new router rows, shared experts as they are)
is built from the smaller config's own module class, its experts in the family's in-memory
layout (transposed, interleaved, with biases where the family's are); the original layer
runs on the carried states while a hook records its block's input x and output y. With the
smaller block's routing g_tj (its own router on x) and its experts' activations
h_j(x) = act(G_j x) * (U_j x) (the family's own: GPT-OSS's clamped SwiGLU with biases), its
output is

    y'(x) = s(x) + sum_j g_tj D_j h_j(x),      s(x): shared experts (and their gate), down biases

(Llama 4's router scales the input instead: D_j h_j(g_tj x)), which is linear in
D = [D_1 ... D_N] [H, N x I]: with z_t = [g_t1 h_1(x_t), ..., g_tN h_N(x_t)]
(`MoEFamily.routed_hidden`) the ridge solution of sum_t ||(y_t - s(x_t)) - D z_t||^2
(refit.py) makes the smaller block's output match the original block's on the calibration
tokens, routing included. Shared experts beside the block (Granite's) are part of s.
The fitted block replaces the original one for the following layers. The Gram matrix is
(N x I)^2 float64: 4 x 14336 experts of Mixtral would need 26 GB, so large experts need
fewer kept experts per fit than this simple joint solve handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers

from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerVisitor, layer_compute_dtype
from mergekit_moe2dense.calibration.refit.blocks import SparseBlock
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.graph.builders import expert_key
from mergekit_moe2dense.merge import mixture
from mergekit_moe2dense.reassemble import mix_rows
from mergekit_moe2dense.refit import LeastSquaresStats, fit_down_proj, squared_error

__all__ = ["SmallerMoEFit", "fit_smaller_moe"]


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
        num, width = self.weights.shape[0], family.expert_width(stream.source.config)
        downs = [piece["down"] for piece in _memory_slices(family, index, num, width)]
        held = _held(experts, downs[0])
        old_down = torch.cat([piece.take(held).float() for piece in downs], dim=1)  # [H, N*I]
        # shared experts beside the block (Granite's shared_mlp) are part of the recorded output
        shared = stream.model.get_submodule(block.shared_path) if block.shared_path else None
        stats = LeastSquaresStats()

        def add(x: torch.Tensor, y: torch.Tensor) -> None:
            dtype = held.dtype
            _, weights, index_ = family.router_outputs(router(x.to(dtype)))
            features = x.new_zeros(x.shape[0], num * width)
            for j in range(num):
                token, slot = (index_ == j).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                hidden = family.routed_hidden(experts, x[token].to(dtype), weights[token, slot], j)
                features[token, j * width : (j + 1) * width] = hidden.float()
            out = new(x.to(dtype)[None])
            out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape).float()
            if shared is not None:
                out = (
                    out + shared.forward(x.to(dtype)[None]).reshape(x.shape).float()
                )  # forward: not its recording hook
            # the smaller block's residual y - y'(x) = (y - s(x)) - D_old z, s = out - D_old z
            stats.add_batch(features, y - out)
            energy[0] += float(((y - out + features @ old_down.T) ** 2).sum())

        energy = [0.0]
        block.record(add)
        block.release(shared=False)  # the shared experts stay beside the smaller block
        # ridge on the change D - D_old: an expert no calibration token reaches keeps its D
        change = fit_down_proj(stats, self.damping)
        down = (old_down.double() + change.to(old_down.device)).float()
        total = max(energy[0], 1e-30)
        self.result.errors[index] = (stats.yy / total, squared_error(stats, change) / total)
        with torch.no_grad():
            for j, piece in enumerate(downs):
                fitted = down[:, j * width : (j + 1) * width]
                piece.take(held).copy_(fitted.to(held.dtype))
                self.result.tensors[expert_key(index, j, "down")] = fitted.cpu()


def _memory_slices(family, layer: int, num: int, width: int) -> tuple[dict[str, ExpertSlice], ...]:
    """The N experts' slices of the block's fused experts module (its in-memory layout)."""
    return family.memory_layout().slices(layer, num, width)


def _held(experts: torch.nn.Module, piece: ExpertSlice) -> torch.Tensor:
    """The experts module's tensor that `piece` (a slice of the memory layout) lies in."""
    return getattr(experts, piece.tensor.rsplit(".", 1)[-1])


def _fill(new: torch.nn.Module, block: SparseBlock, moe: MoELayer, weights: torch.Tensor) -> None:
    """The smaller block's tensors: merged experts (biases included) written into the family's
    in-memory layout, expert-indexed rows mixed (`weights` [N, E]), everything else (shared
    experts, their gate) the original block's."""
    device = block.stream.device
    family = block.stream.family
    new.to_empty(device=device)
    original = dict(block.module.state_dict())
    width = family.expert_width(block.stream.source.config)
    memory = _memory_slices(family, block.index, weights.shape[0], width)
    fused = {f"experts.{piece.tensor.rsplit('.', 1)[-1]}" for expert in memory for piece in expert.values()}
    with torch.no_grad():
        targets = dict(new.named_parameters())
        targets.update(dict(new.named_buffers()))
        for name, target in targets.items():
            if name in fused:
                continue
            value = original[name]
            if value.shape != target.shape:  # indexed by expert: the new experts' mix of rows
                axis = next(d for d, (a, b) in enumerate(zip(value.shape, target.shape)) if a != b)
                value = mix_rows(value, weights.to(device), axis)
            target.copy_(value.to(target.dtype))
        for j, row in enumerate(weights.tolist()):
            for projection, piece in memory[j].items():
                merged = mixture(block.load, [expert[projection] for expert in moe.experts], row)
                held = _held(new.experts, piece)
                piece.take(held).copy_(merged.to(held.dtype))


def fit_smaller_moe(
    source,
    config: transformers.PretrainedConfig,
    layers: list[MoELayer],
    weights: torch.Tensor,
    batches,
    damping: float,
    settings: StreamSettings | None = None,
) -> SmallerMoEFit:
    """Fitted down projections of every new expert of the smaller MoE `config` (N experts,
    `weights` [N, L, E] over `layers`, whose slices may be aligned), layer by layer."""
    settings = settings or StreamSettings()
    result = SmallerMoEFit()
    # the new blocks run inside streamed layers
    compute_dtype = layer_compute_dtype(settings.dtype, settings.device, settings.compute_dtype)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    by_index = {layer.index: (position, layer) for position, layer in enumerate(layers)}
    with LayerStream.of(source, batches, settings) as stream:
        visitor = _Pruning(skeleton, by_index, weights, damping, result)
        stream.run(visitor, desc="Re-fitting", progress=settings.progress)
    return result
