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


def test_written_docs_record_the_command_that_made_the_table(monkeypatch, tmp_path):
    (tmp_path / "benchmarks.md").write_text(
        "# Benchmarks\n\nbefore\n\n<!-- quality:example:begin -->\nOLD-SECTION\n<!-- quality:example:end -->\n\nafter\n"
    )
    monkeypatch.setattr(quality, "DOCS", tmp_path)
    report = {
        "recipe_hash": "abc",
        "preset": {
            "name": "example",
            "num_layers": 2,
            "hidden_size": 64,
            "num_experts": 8,
            "intermediate_size": 192,
            "experts_per_token": 2,
            "vocab_size": 1024,
        },
    }
    quality.write_quality_docs("example", "| table |", "summary", report, 60.0, True, 20000, ("none",))
    text = (tmp_path / "benchmarks.md").read_text()
    assert (
        "`python benchmarks/quality.py --preset example --grid --max-tokens 20000 --fit-methods none --write-docs`"
        in text
    )
    assert "OLD-SECTION" not in text and text.index("before") < text.index("| table |") < text.index("after")
    quality.write_quality_docs("example", "| table |", "summary", report, 60.0, False, 500)
    assert (
        "`python benchmarks/quality.py --preset example --max-tokens 500 --write-docs`"
        in (tmp_path / "benchmarks.md").read_text()
    )
