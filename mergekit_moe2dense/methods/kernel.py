# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge kernel every method shares: one weighted sum of a layer's experts.

    W = sum_e w_e W_e

accumulated in float32 (float64 if any input is), whatever the experts' dtype.
`graph.MergeExperts` calls it for every block of every projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["weighted_sum"]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_e w_e W_e over equal-shaped tensors on one device.

    In-place mixed-dtype adds upcast each expert inside the kernel: no float32
    copy of every expert, one pass over its memory (the merge is memory-bound).
    """
    if not tensors or len(tensors) != len(weights):
        raise ValueError(
            f"weighted_sum needs one weight per tensor (got {len(tensors)} tensors, {len(weights)} weights)"
        )
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise ValueError(f"expert shapes differ: {[tuple(t.shape) for t in tensors]}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # not torch.mul(..., out=result): that computes in the inputs' bf16
    result = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor, alpha=float(weight))
    return result
