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

from benchmarks.onednn_cache import SETTINGS
from benchmarks.scale import GB

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
    scale, heal = results["scale"], results["heal"]
    calibration, merge = scale["calibration"], scale["merge"]
    fit = scale["conversion"]["refit_fit"]
    assert "refit" in fit["phases"]  # measured, not skipped
    assert heal["heal_vs_plain"] == pytest.approx(heal["heal_tokens_per_s"] / heal["plain_loop_tokens_per_s"])
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.startswith("Device: CPU.") and "`bash benchmarks/gpu_check.sh --device cpu --smoke`" in table
    assert "skipped" not in table
    # every measurement has its row, showing the figure the JSON holds
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    expected = {
        "calibration `full`, bf16": f"{calibration['full']['tokens_per_s']:.1f} tokens/s",
        "calibration `layerwise`, bf16": f"{calibration['layerwise']['tokens_per_s']:.1f} tokens/s",
        "layerwise / full throughput": f"{calibration['ratios']['throughput_layerwise_vs_full']:.2f}x",
        "merge (expert_uniform)": f"{merge['moe2dense']['wall_s']:.1f} s",
        "one raw read of the checkpoint": f"{merge['raw_read']['wall_s']:.1f} s",
        "one raw read with O_DIRECT": f"{merge['raw_read_direct']['wall_s']:.1f} s",
        "merge / raw read (mean of before and after)": f"{merge['ratios']['moe2dense_vs_raw_read']:.2f}x plain",
        "`refit: fit` per layer": f"{fit['refit_s_per_layer']:.2f} s",
        "`heal` / plain transformers distillation loop (steady state)": (
            f"{heal['heal_tokens_per_s']:.1f} / {heal['plain_loop_tokens_per_s']:.1f} tokens/s"
        ),
    }
    assert set(rows) == {"measurement", *expected}
    assert all(figure in rows[label] for label, figure in expected.items()), rows


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
    assert list(results["runs"]) == list(SETTINGS)  # off, then oneDNN's default
    off, default = results["runs"].values()
    for run in (off, default):
        assert len(run["calibration_tokens_per_s"]) == len(run["heal_tokens_per_s"]) == 1
    # one round: the summary's medians are the runs' figures, off over (or less) the default
    assert results["off_vs_default"] == pytest.approx(
        {
            "calibration_tokens_per_s": off["calibration_tokens_per_s"][0] / default["calibration_tokens_per_s"][0],
            "calibration_peak_rss_gb": (off["calibration_peak_rss_bytes"][0] - default["calibration_peak_rss_bytes"][0])
            / GB,
            "heal_tokens_per_s": off["heal_tokens_per_s"][0] / default["heal_tokens_per_s"][0],
        }
    )
