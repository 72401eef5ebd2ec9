# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`benchmarks/gpu_check.sh --device cpu --smoke` and `benchmarks/onednn_cache.py --smoke` run
end to end and measure every row, so that the GPU run stays one short call and neither rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# subprocesses that write, merge, calibrate and heal checkpoints
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["device"] == "CPU"
    calibration = results["scale"]["calibration"]
    assert calibration["full"]["tokens_per_s"] > 0 and calibration["layerwise"]["tokens_per_s"] > 0
    assert results["scale"]["merge"]["moe2dense"]["wall_s"] > 0
    assert results["scale"]["conversion"]["refit_fit"]["refit_s_per_layer"] > 0  # measured, not skipped
    heal = results["heal"]
    assert heal["heal_tokens_per_s"] > 0 and heal["plain_loop_tokens_per_s"] > 0
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.startswith("Device: CPU.") and "`bash benchmarks/gpu_check.sh --device cpu --smoke`" in table
    assert "skipped" not in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 10  # the header and nine measurements


def test_onednn_cache_smoke(tmp_path):
    report = tmp_path / "onednn.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "onednn_cache.py"), "--smoke", "--workdir", str(tmp_path / "w"),
         "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(report.read_text())
    assert len(results["runs"]) == 2
    for run in results["runs"].values():
        assert len(run["calibration_tokens_per_s"]) == len(run["heal_tokens_per_s"]) == 1
        assert run["calibration_peak_rss_bytes"][0] > 0 and run["heal_tokens_per_s"][0] > 0
    assert set(results["off_vs_default"]) == {
        "calibration_tokens_per_s",
        "calibration_peak_rss_gb",
        "heal_tokens_per_s",
    }
