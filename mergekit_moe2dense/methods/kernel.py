# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge kernel every method shares: one weighted sum of a layer's experts.

    W = sum_e w_e W_e

accumulated in float32 (float64 if any input is), whatever the experts' dtype.
`graph.MergeExperts` calls it for every block of every projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["weighted_sum"]


def weighted_sum(
    tensors: Sequence[torch.Tensor] | Callable[[int], torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum_e w_e W_e over equal-shaped tensors on one device.

    `tensors` is a sequence, or a function e -> W_e called once per expert in order, so that
    only one expert need be in memory at a time (the merge reads each from the checkpoint).
    In-place mixed-dtype adds upcast each expert inside the kernel: no float32 copy of every
    expert, one pass over its memory (the merge is memory-bound).
    """
    load = tensors if callable(tensors) else None
    if load is None and (not tensors or len(tensors) != len(weights)):
        raise ValueError(
            f"weighted_sum needs one weight per tensor (got {len(tensors)} tensors, {len(weights)} weights)"
        )
    if not weights:
        raise ValueError("weighted_sum needs at least one tensor")
    load = load or tensors.__getitem__
    result = None
    for e, weight in enumerate(weights):
        tensor = load(e)
        if result is None:
            dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            # not torch.mul(..., out=result): that computes in the inputs' bf16
            result = torch.zeros(tensor.shape, dtype=dtype, device=tensor.device)
        elif tensor.shape != result.shape:
            raise ValueError(f"expert shapes differ: {tuple(result.shape)} and {tuple(tensor.shape)}")
        if tensor.dtype == torch.float64 and result.dtype != torch.float64:
            result = result.double()
        result.add_(tensor, alpha=float(weight))
        del tensor
    return result
