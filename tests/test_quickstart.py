# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""benchmarks/quickstart.py, the README's first command: inspect picks the method, the dense
model is written and scored on the same windows as the MoE."""

from __future__ import annotations

import json

import pytest

from benchmarks import quickstart
from mergekit_moe2dense.inspection import VERDICTS
from mergekit_moe2dense.recommend import recommend


def test_every_verdict_converts_as_inspect_recommends_and_averages_only_when_aligned(tmp_path):
    for verdict in VERDICTS:
        spec = quickstart.recommended_config(verdict, tmp_path / "moe", tmp_path / "calib", 128)
        assert (spec["merge_method"], spec["parameters"]) == (
            recommend(verdict).merge_method,
            recommend(verdict).parameters,
        )
        averaging = spec["merge_method"] in ("router_weighted", "top_k_tempered", "expert_uniform")
        assert averaging == (verdict == "aligned")
        assert spec["calibration"]["dataset"] == str(tmp_path / "calib")
        assert spec["calibration"]["num_samples"] == recommend(verdict).num_samples


def test_verdict_line_reports_the_ratio():
    assert "+10.0%" in quickstart.verdict_line(20.0, 22.0) and "ratio 1.100" in quickstart.verdict_line(20.0, 22.0)
    assert "close to the MoE" in quickstart.verdict_line(20.0, 20.5)
    assert "far from the MoE" in quickstart.verdict_line(20.0, 30.0)


@pytest.mark.slow  # trains the smoke testbed
def test_quickstart_converts_and_scores_the_smoke_testbed(smoke_testbed, tmp_path, capsys):
    out = tmp_path / "dense"
    result = quickstart.run("smoke", out, str(smoke_testbed.root.parent), max_tokens=500, progress=False)
    printed = capsys.readouterr().out
    expected = recommend(result["inspect_verdict"])
    assert result["method"] == {"merge_method": expected.merge_method, "parameters": expected.parameters}
    assert result["ratio"] == pytest.approx(result["dense_perplexity"] / result["moe_perplexity"])
    assert json.loads((out / "expert_weights.json").read_text())["method"] == result["method"]["merge_method"]
    assert (out / "config.json").is_file() and (tmp_path / "dense.yml").is_file()
    assert "verdict: the dense model" in printed and f"{result['dense_perplexity']:.3f}" in printed
