# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The per-layer steps of the layer-sequential re-fit (`LayerFitter`s): layer l's `SparseBlock`
and its plan in, the dense MLP that replaces the block out (`LayerFit`); driver.py runs one on
every planned layer.

The step here is `closed_form_fit`: the MoE layer runs on the carried states
while a hook records its sparse block's input x (post-attention-norm hidden
states) and output y (the target); the dense MLP of the plan is evaluated on
the same x and its down projection re-fitted to y (refit.py). With
`gate_up="regmean"` a first pass gathers the Gram matrix of the tokens routed
to each expert, and every block's gate/up is the RegMean merge of its experts
instead of the plain weighted sum.

`gradient_fit` (`refit: fit`) is a second `LayerFitter`: it starts from
`closed_form_fit` with the down_proj re-fit, records the block's (x, y) pairs of
every calibration token (tokens x hidden x 2 float32 on the device: these stay in
memory even with `spill_dir`, which only moves the carried states to disk), and
fits gate, up and down of the whole dense MLP (shared-expert blocks included) by
Adam, keeping the step with the best held-out error (`refit.fit_mlp`).
Only one layer's weights and the calibration activations are in memory.

Expert biases (GPT-OSS) are part of the dense MLP, merged as its matrices are (a merged
expert's bias is the same weighted sum; concatenated blocks' down biases add up): the
down_proj re-fit fits [D, b_d] on the features [h, 1] (the bias's ones column is not
damped: the same solution as centring h and y, from the same running sums, so the
recorded error is exact); `scale` scales D and b_d per output channel (the output is
D h + b_d); RegMean merges [W, b] on the inputs [x, 1]; the gradient fit fits every
projection and bias. A family whose experts compute something other than
act(G x) * (U x) (GPT-OSS's clamped SwiGLU) gives its own h (`MoEFamily.dense_hidden`:
its expert computation on the dense MLP as one expert), used by all of them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergekit_moe2dense.calibration.refit.blocks import DenseMLP, SparseBlock
from mergekit_moe2dense.memory import release_freed_memory
from mergekit_moe2dense.merge import assemble, assemble_biases
from mergekit_moe2dense.plan import LayerPlan, block_dim, block_terms
from mergekit_moe2dense.refit import (
    FitSettings,
    LeastSquaresStats,
    fit_channel_scale,
    fit_down_proj,
    fit_mlp,
    mlp_error,
    regmean_merge,
    squared_error,
)

LOG = logging.getLogger(__name__)

__all__ = ["REFIT_MODES", "LayerFit", "LayerFitter", "closed_form_fit", "gradient_fit", "refit_fitter"]

REFIT_MODES = ("none", "scale", "down_proj", "fit")


@dataclass
class LayerFit:
    """What a per-layer step returns."""

    dense: DenseMLP  # replaces the sparse block; its outputs are the next layer's inputs
    tensors: dict[str, torch.Tensor]  # projection ("gate", "up", "down") -> fitted tensor, to be written
    error: tuple[float, float]  # relative squared error of the block's output before, after the fit
    # a fit that holds tokens out: its relative error on them at the start, at the end
    heldout: tuple[float, float] | None = None


# The per-layer step: (layer l's sparse block, its plan) -> the dense MLP replacing it.
LayerFitter = Callable[[SparseBlock, LayerPlan], LayerFit]


def refit_fitter(mode: str, damping: float, gate_up: str = "merge", fit: FitSettings | None = None) -> LayerFitter:
    """The per-layer step of a re-fit: down unless `mode` is none; gate and up with
    `gate_up="regmean"` or `mode="fit"`, whose settings are `fit`."""
    if mode not in REFIT_MODES:
        raise ValueError(f"unknown refit mode {mode!r}")
    if mode == "fit":
        return functools.partial(gradient_fit, settings=fit or FitSettings(), damping=damping, gate_up=gate_up)
    return functools.partial(closed_form_fit, mode=mode, damping=damping, gate_up=gate_up)


def closed_form_fit(
    block: SparseBlock,
    plan: LayerPlan,
    *,
    mode: str,
    damping: float,
    gate_up: str = "merge",
    release: bool = True,
) -> LayerFit:
    """The plan's dense MLP (gate/up by RegMean with `gate_up="regmean"`), its down
    projection (and down bias) re-fitted by least squares (`mode`: none, scale, down_proj). With
    `release` the sparse block's weights are freed once recorded (`SparseBlock.release`), before
    the solve."""
    biased = "gate_bias" in plan.layer.experts[0]  # GPT-OSS: gate_up and down biases
    grams = _routed_grams(block, plan.layer.num_experts, biased) if gate_up == "regmean" else None
    tensors = {**assemble(plan, block.load), **assemble_biases(plan, block.load)}
    fitted = {}
    if grams is not None:
        for projection in ("gate", "up"):
            merged = _regmean_projection(plan, projection, grams, block.load, damping, biased)
            tensors[projection] = fitted[projection] = merged[0]
            if biased:
                tensors[f"{projection}_bias"] = fitted[f"{projection}_bias"] = merged[1]
    release_freed_memory()  # the expert slices read for the sums, before the Gram matrices are made
    dense = block.dense(tensors)
    down, bias, error = _fit_down(block, dense, mode, damping, release)
    if mode != "none":
        fitted["down"] = down
        if bias is not None:
            fitted["down_bias"] = bias
    dense.down = down
    if bias is not None:
        dense.biases["down_bias"] = bias
    return LayerFit(dense, fitted, error)


def gradient_fit(
    block: SparseBlock, plan: LayerPlan, *, settings: FitSettings, damping: float, gate_up: str = "merge"
) -> LayerFit:
    """`refit: fit`: gate, up and down (and the experts' biases, where they have them) of the
    layer's dense MLP fitted by Adam to the block's output, from the closed-form down_proj
    re-fit of the plan's merge; the step with the lowest error on held-out calibration tokens
    is kept (the start included, so the fit never ends worse than least squares there)."""
    start = closed_form_fit(block, plan, mode="down_proj", damping=damping, gate_up=gate_up, release=False)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    block.record(lambda x, y: pairs.append((x, y)))
    # recorded under inference_mode: fresh tensors here, so that autograd may save them
    x, y = (torch.cat(part).clone() for part in zip(*pairs))
    pairs.clear()
    dense = start.dense
    fit = fit_mlp(x, y, dense.gate, dense.up, dense.down, block.act, settings, biases=dense.biases, hidden=dense.hidden)
    tensors = {"gate": fit.gate, "up": fit.up, "down": fit.down, **fit.biases}
    fitted = block.dense(tensors)
    merged = start.error[0]
    error = (merged, mlp_error(x, y, fit.gate, fit.up, fit.down, None, biases=fit.biases, hidden=fitted.hidden))
    LOG.debug(
        "layer %d: held-out relative error %.4g (least squares) -> %.4g (fit, best step %d of %d, %d held-out tokens)",
        block.index,
        fit.start_error,
        fit.best_error,
        fit.best_step,
        settings.steps,
        fit.holdout_tokens,
    )
    return LayerFit(fitted, tensors, error, heldout=(fit.start_error, fit.best_error))


def _fit_down(block: SparseBlock, dense: DenseMLP, mode: str, damping: float, release: bool):
    """Run the MoE layer on the carried states, recording its block's (x, y); (free the block's
    weights with `release`;) solve. With a down bias b the features are [h, 1] and the solution
    [D, b] (the ones column undamped). Returns the down projection, the down bias (None: the MLP
    has none) and the errors."""
    stats = LeastSquaresStats()
    bias = dense.biases.get("down_bias")
    start = dense.down if bias is None else torch.cat([dense.down, bias[:, None]], dim=1)  # [H, I (+1)]

    def add(x: torch.Tensor, y: torch.Tensor) -> None:
        h = dense.intermediate(x)
        if bias is not None:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        stats.add_batch(h, y, output=h @ start.T if mode == "scale" else None)

    # With `release`, the batches' (x, y) wait for the block to be freed, while they take less
    # memory than its weights and than the float64 sums: the sums are then never allocated beside
    # a layer of experts (the re-fit's peak at 512 tokens, 0.18 GB of bf16 experts beside 0.13 GB
    # of sums), and the peak is never higher than summing at once. Same sums, same order.
    features = start.shape[1]
    budget = min(block.nbytes(shared=True), 8 * features * (features + start.shape[0])) if release else 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_later(x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal budget
        budget -= x.nbytes + y.nbytes
        if budget >= 0:
            pending.append((x, y))
            return
        while pending:
            add(*pending.pop(0))
        add(x, y)

    block.record(add_later)
    if release:
        block.release(shared=True)
    while pending:
        add(*pending.pop(0))  # each pair freed once added
    if mode == "scale":
        down = (fit_channel_scale(stats)[:, None] * start.double()).float()
    elif mode == "down_proj":
        down = fit_down_proj(stats, damping, free=0 if bias is None else 1).float()
    else:
        down = start
    total = max(stats.yy, 1e-30)
    error = (squared_error(stats, start) / total, squared_error(stats, down) / total)
    if bias is None:
        return down, None, error
    return down[:, :-1].contiguous(), down[:, -1].contiguous(), error


def _routed_grams(block: SparseBlock, num_experts: int, biased: bool = False) -> list[torch.Tensor]:
    """Per expert, X_e^T X_e over the (non-padding) tokens the router sends to it (with
    `biased`, of [X_e, 1]: the bias is the weight of an input that is always 1)."""
    grams: list[torch.Tensor] = []
    state = {}
    family = block.stream.family

    def take_input(_module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])[block.keep].double()
        state["x"] = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if biased else x

    def take_routing(_module, _inputs, output):
        _, _, index = family.router_outputs(output)
        index = index.reshape(block.keep.shape[0], -1)[block.keep]
        x = state["x"]
        if not grams:
            grams.extend(x.new_zeros(x.shape[1], x.shape[1]) for _ in range(num_experts))
        for expert in index.unique().tolist():
            routed = x[(index == expert).any(-1)]
            grams[expert] += routed.T @ routed

    block.run(block.module.register_forward_pre_hook(take_input), block.router.register_forward_hook(take_routing))
    return grams


def _regmean_projection(
    plan: LayerPlan, projection: str, grams, load, damping: float, biased: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's gate or up projection as the RegMean merge of its experts, blocks concatenated;
    with `biased`, [W_e, b_e] merged on the Grams of [x, 1], and the merged bias returned too."""
    parts, biases = [], []
    for terms in block_terms(plan, projection):
        if terms.shared is not None:
            parts.append(load(terms.slices[0]).float())
            continue
        projections = [load(piece) for piece in terms.slices]
        if biased:
            bias_slices = [plan.layer.experts[e][f"{projection}_bias"] for e in terms.experts]
            projections = [
                torch.cat([w.double(), load(b).double()[:, None]], 1) for w, b in zip(projections, bias_slices)
            ]
        grams_ = [grams[e] for e in terms.experts]
        merged = regmean_merge(terms.weights, projections, grams_, damping, free=int(biased)).float()
        if biased:
            merged, bias = merged[:, :-1], merged[:, -1]
            biases.append(bias)
        parts.append(merged if terms.scale == 1.0 else merged * terms.scale)
    bias = torch.cat(biases) if biased else None
    return torch.cat(parts, dim=block_dim(projection)), bias
