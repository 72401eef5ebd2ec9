# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A smaller MoE rebuilt from k merged MLPs: its new routers and expert-indexed rows.

Expert j of layer l is the merge of the layer's old experts with weights w_jl
(one `Block`, as a dense MLP). The new router [k, H] of each layer is either

- closed form: row j = sum_e w_jle x old router row e. Expert j is that mix of
  the old experts, so its logit is the same mix of theirs (the expected old
  logit under w_jl); with `features: logits`, T = 1 this is softmax(c_j) as in
  arcee-ai/mergekit#267;
- fitted: multinomial logistic regression (scikit-learn, L2, no intercept: a router
  bias, GPT-OSS's, keeps its closed-form rows) of the cluster id on the
  router's recorded inputs (the hidden states of the sampled calibration tokens).
  No gradient step touches the rest of the model.

Every other tensor of the block indexed by expert (a router bias, DeepSeek-V3's correction
bias, ERNIE's statistics [1, E]) gets the same closed-form rows; shared experts and their
gates are copied. The experts are written in the family's `moe_layout`: per-expert tensors,
or (GPT-OSS, Llama 4, Granite) the fused [k, ...] tensors of each layer, stacked.

The routers are computed in memory and enter the graph as `graph.ComputedTensor`
tasks, so the whole output is still written by one task graph (`graph.plan_moe_merge`:
read -> merge -> `SaveTensor` -> `FinalizeModel`).
"""

from __future__ import annotations

import numpy as np
import torch

from mergekit_moe2dense.families import MoELayer

__all__ = ["closed_form_router", "closed_form_rows", "fitted_router", "mix_rows"]


def closed_form_router(old_router: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[k, H] = weights [k, E] @ old router [E, H]."""
    return weights.double() @ old_router.double()


def fitted_router(inputs: torch.Tensor, labels: np.ndarray, k: int, *, seed: int = 0) -> torch.Tensor:
    """[k, H]: logistic regression of `labels` [N] on `inputs` [N, H].

    For two classes scikit-learn fits one vector w; softmax(-w/2, w/2) is the
    same model. A cluster with no token in this layer keeps a zero row.
    """
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    rows = np.zeros((k, inputs.shape[1]))
    if len(present) == 1:  # one group only: nothing to separate
        return torch.from_numpy(rows)
    model = LogisticRegression(fit_intercept=False, max_iter=2000, random_state=seed)
    model.fit(inputs.double().numpy(), labels)
    coef = model.coef_
    if len(present) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
    rows[present] = coef
    return torch.from_numpy(rows)


def mix_rows(value: torch.Tensor, weights: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """`value` with its expert dim `axis` (size E) replaced by k rows: row j = sum_e weights[j, e]
    x row e (float64 arithmetic; a kept expert's own row when weights[j] is one-hot)."""
    moved = value.double().movedim(axis, 0)
    mixed = weights.double() @ moved.reshape(moved.shape[0], -1)
    return mixed.reshape(-1, *moved.shape[1:]).movedim(0, axis)


def closed_form_rows(source, layer: MoELayer, weights: torch.Tensor, router: torch.Tensor | None = None) -> dict:
    """Every expert-indexed tensor of a smaller MoE's block (the router [k, H], a correction
    bias [k], ERNIE's statistics [1, k], ...) by output name: new expert j's row is
    sum_e weights[j, e] x old row e; `router` [k, H] replaces the router's."""
    rows = {}
    for name, output, axis in source.family.moe_block_tensors(source.config, layer.index, source.tensor_names):
        if axis is None:
            continue
        if router is not None and output == source.family.moe_router_name(layer.index):
            rows[output] = router.float()
            continue
        rows[output] = mix_rows(source.reader.read(name), weights, axis).float()
    return rows
