# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`benchmarks/scale.py --smoke` runs end to end, so the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scale import GB

# a subprocess that writes and merges checkpoints
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_scale_benchmark_smoke(tmp_path):
    workdir, report = tmp_path / "work", tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scale.py"),
            "--smoke",
            "--workdir",
            str(workdir),
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(report.read_text())
    calibration = results["calibration"]
    assert calibration["full"]["tokens"] == calibration["layerwise"]["tokens"] > 0
    assert calibration["ratios"]["max_abs_mean_prob_diff"] < 1e-5  # both engines saw the same tokens
    # float32 calibration (the default): both engines compute in it, and say so
    assert calibration["full"]["compute_dtype"] == calibration["layerwise"]["compute_dtype"] == "float32"
    merge = results["merge"]
    assert set(merge["ratios"]) == {
        "moe2dense_vs_mergekit_linear",
        "moe2dense_vs_raw_read",
        "moe2dense_vs_raw_read_direct",
        "peak_rss_moe2dense_vs_mergekit_linear",
    }
    # each raw read, plain and with O_DIRECT (plain too where the file system has none), before the
    # merges and after, reads the whole checkpoint, at the throughput reported
    for read in ("raw_read", "raw_read_direct", "raw_read_after", "raw_read_after_direct"):
        assert merge[read]["read_gb_per_s"] * GB * merge[read]["wall_s"] == pytest.approx(
            results["checkpoint"]["bytes"]
        )
    assert 0 < merge["moe2dense"]["written_bytes"] < merge["mergekit_linear"]["written_bytes"]
    conversion = results["conversion"]  # whole conversions, the peak of each phase
    assert set(conversion) == {"router_weighted", "refit"}
    assert {"prepare", "calibration", "merge_and_write"} <= set(conversion["router_weighted"]["phases"])
    assert "refit" in conversion["refit"]["phases"]  # measured, not skipped
    for entry in conversion.values():
        # the phases are parts of the conversion, each timed once
        assert sum(phase["seconds"] for phase in entry["phases"].values()) <= entry["wall_s"]
        peaks = [phase["peak_rss_bytes"] for phase in entry["phases"].values()]
        # VmRSS/VmHWM (per phase) and ru_maxrss (the process) are synced from per-thread counters at
        # different moments: they agree to well under 1%
        assert 0 < max(peaks) <= 1.01 * entry["peak_rss_bytes"]
    assert not workdir.exists()  # generated checkpoints are cleaned up
