# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""How a layer stream runs: one small frozen value, built once per run and passed down.

Every pass over the layer stream (router statistics, the re-fits) runs with the same
device, dtypes, spill directory and progress flag; `engine.stream_settings` builds
them from the calibration config, and the passes read them from here instead of taking
each as a parameter of their own. This module imports nothing of the package, so any
module of it (the layer stream itself included) can take a `StreamSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StreamSettings"]


@dataclass(frozen=True)
class StreamSettings:
    """The settings of one run's layer-streamed passes.

    - `device`: where each streamed layer and the carried activations live (`cuda:1`, `cpu`).
    - `dtype`: the carried activations' dtype, the calibration dtype
      (`engine.calibration_dtype`).
    - `compute_dtype`: the dtype each streamed layer is held and computed in
      (`engine.compute_dtype`); None leaves it to `layerwise.layer_compute_dtype`'s default
      for `dtype` on `device`.
    - `spill_dir`: where the carried activations go on disk instead of the device (None: kept
      on the device).
    - `progress`: whether the pass shows a progress bar.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None
    spill_dir: str | None = None
    progress: bool = True
