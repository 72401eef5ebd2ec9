# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-sequential re-fit's driver: every planned layer converted in order on the streaming
engine (GPTQ's / llm-compressor's sequential loop, here `LayerStream.run` with the `_Converting`
visitor). The carried hidden states are the outputs of the *already converted* dense layers
0..l-1; the per-layer step (a `fitters.LayerFitter`) gets layer l's `SparseBlock` and its plan
and returns the dense MLP that replaces the block (`LayerFit`); the dense layer l (the MoE layer
with its sparse block swapped for that MLP) produces the next layer's inputs. The fitted
tensors, errors and timings are gathered in a `RefitResult`."""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerVisitor
from mergekit_moe2dense.calibration.refit.blocks import SparseBlock
from mergekit_moe2dense.calibration.refit.fitters import LayerFitter, refit_fitter
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.plan import LayerPlan
from mergekit_moe2dense.refit import FitSettings

__all__ = ["RefitResult", "fit_layers", "refit_layers"]


@dataclass
class RefitResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # dense name -> fitted [H, I]
    # decoder layer -> (relative squared error of the sparse block's output before, after the fit),
    # sum_t ||y_t - D h_t||^2 / sum_t ||y_t||^2 on the calibration tokens
    errors: dict[int, tuple[float, float]] = field(default_factory=dict)
    # decoder layer -> the same on the held-out tokens, start -> end (`refit: fit` only)
    heldout: dict[int, tuple[float, float]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # decoder layer -> wall time of its fit


class _Converting(LayerVisitor):
    """Runs the per-layer step on every planned layer and swaps in its dense MLP."""

    def __init__(self, plans: Sequence[LayerPlan], fitter: LayerFitter, result: RefitResult):
        self.plans = {plan.layer.index: plan for plan in plans}
        self.fitter = fitter
        self.result = result

    def prepare_layer(self, stream, index, layer):
        plan = self.plans.get(index)
        if plan is None:
            return {}
        block = SparseBlock.of(stream, index, layer)
        start = time.perf_counter()
        fit = self.fitter(block, plan)
        self.result.seconds[index] = time.perf_counter() - start
        names = stream.family.dense_mlp_names(index, fit.tensors)
        self.result.tensors.update({names[p]: tensor.cpu() for p, tensor in fit.tensors.items()})
        self.result.errors[index] = fit.error
        if fit.heldout is not None:
            self.result.heldout[index] = fit.heldout
        return block.swaps(fit.dense)


def fit_layers(
    source,
    plans: Sequence[LayerPlan],
    batches: list[TokenBatch],
    fitter: LayerFitter,
    stream: StreamSettings | None = None,
    store: MutableMapping[str, torch.Tensor] | None = None,
) -> RefitResult:
    """Every planned layer converted in order by `fitter`, on the layer stream. The fitted
    tensors go into `store` (default: a dict; e.g. `graph.SpilledTensors`, to keep them on disk)."""
    stream = stream or StreamSettings()
    result = RefitResult(tensors=store if store is not None else {})
    with LayerStream.of(source, batches, stream) as layers:
        layers.run(_Converting(plans, fitter, result), desc="Re-fitting", progress=stream.progress)
    return result


def refit_layers(
    source,
    plans: Sequence[LayerPlan],
    batches: list[TokenBatch],
    *,
    mode: str,
    damping: float,
    gate_up: str = "merge",
    fit: FitSettings | None = None,
    **stream,
) -> RefitResult:
    """Fitted projections of every planned layer (`refit_fitter`), and the layers'
    reconstruction errors; `stream` holds `StreamSettings` fields (device, dtype, ...)."""
    fitter = refit_fitter(mode, damping, gate_up, fit)
    return fit_layers(source, plans, batches, fitter, StreamSettings(**stream))
