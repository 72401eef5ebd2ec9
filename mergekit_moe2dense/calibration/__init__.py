# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration: text -> token batches -> router hooks -> RouterStatistics."""

from mergekit_moe2dense.calibration.batches import TokenBatch, calibration_sequences, pad_batches
from mergekit_moe2dense.calibration.distributed import Ranks, collect_router_statistics_distributed
from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerStreamError
from mergekit_moe2dense.calibration.runner import (
    RouterRecorder,
    collect_router_statistics,
    collect_router_statistics_layerwise,
    input_device,
    load_calibration_batches,
    load_moe,
)
from mergekit_moe2dense.calibration.stats import RouterStatistics, StatisticsError

__all__ = [
    "LayerStream",
    "LayerStreamError",
    "Ranks",
    "RouterRecorder",
    "RouterStatistics",
    "StatisticsError",
    "TokenBatch",
    "calibration_sequences",
    "collect_router_statistics",
    "collect_router_statistics_distributed",
    "collect_router_statistics_layerwise",
    "input_device",
    "load_calibration_batches",
    "load_moe",
    "pad_batches",
]
