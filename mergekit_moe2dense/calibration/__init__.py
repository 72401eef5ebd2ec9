# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration: text -> token batches -> router hooks -> RouterStatistics.

`load_calibration_batches` tokenizes once; `collect_statistics` is the one entry
point of the statistics pass (engine, dtype and torchrun ranks chosen there);
`LayerStream.run` is the one layer loop (statistics, re-fit), and `StreamSettings`
(built by `stream_settings`) the settings every pass over it shares.
"""

from mergekit_moe2dense.calibration.batches import TokenBatch, calibration_sequences, pad_batches
from mergekit_moe2dense.calibration.distributed import Ranks
from mergekit_moe2dense.calibration.engine import (
    calibration_dtype,
    calibration_engine,
    collect_statistics,
    compute_dtype,
    stream_settings,
)
from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerStreamError, LayerVisitor
from mergekit_moe2dense.calibration.runner import RouterRecorder, load_calibration_batches, load_moe
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.statistics import RouterStatistics, StatisticsError

__all__ = [
    "LayerStream",
    "LayerStreamError",
    "LayerVisitor",
    "Ranks",
    "RouterRecorder",
    "RouterStatistics",
    "StatisticsError",
    "StreamSettings",
    "TokenBatch",
    "calibration_dtype",
    "calibration_engine",
    "calibration_sequences",
    "collect_statistics",
    "compute_dtype",
    "load_calibration_batches",
    "load_moe",
    "pad_batches",
    "stream_settings",
]
