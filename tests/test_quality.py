# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The quality benchmark runs end to end on the smoke testbed, so it cannot rot."""

import pytest

from benchmarks import quality


@pytest.mark.slow  # trains the smoke testbed
def test_quality_benchmark_smoke(smoke_testbed, tmp_path):
    report = quality.run(
        "smoke",
        cache_dir=str(smoke_testbed.root.parent),
        grid=False,
        max_tokens=500,
        write_docs=False,
        work_dir=str(tmp_path),
        fit={"fit_steps": 20},
    )
    lines = report.splitlines()
    for label in (
        "MoE",
        "ancestor (dense)",
        "dense twin",
        "expert_uniform",
        "router_weighted mean_logit",
        "top_k_tempered",
        "concat m=2 (refit: fit)",
    ):
        assert any(line.startswith(f"| {label}") for line in lines), label
    moe_row = next(line for line in lines if line.startswith("| MoE"))
    assert "| 1.000 |" in moe_row
    assert "Best calibrated method" in report
    assert "| held-out error, least-squares start |" in report  # the fit's per-layer table


def test_smoke_flag_selects_the_smoke_preset(monkeypatch):
    seen = {}
    monkeypatch.setattr(quality, "run", lambda preset, *args: seen.setdefault("preset", preset) or "")
    quality.main(["--smoke"])
    assert seen["preset"] == "smoke"
