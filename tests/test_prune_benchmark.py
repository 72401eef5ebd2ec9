# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The smaller-MoE and ancestor benchmarks run end to end on the smoke testbed, so they cannot rot."""

import pytest

from benchmarks import ancestor, prune


def rows(report: str) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for line in report.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }


@pytest.mark.slow  # trains the smoke testbed
def test_prune_benchmark_smoke(smoke_testbed, tmp_path):
    report = prune.run("smoke", 500, True, str(tmp_path), cache_dir=str(smoke_testbed.root.parent))
    table = rows(report)
    assert table["MoE (4 experts, top-2)"][-1] == "1.000"
    for label in (
        "prune 3 by reap",
        "prune 2 by frequency",
        "merge 2 by outputs, align weights",
        "prune 2 by reap + refit",
    ):
        assert float(table[label][-1]) > 0.5, label


@pytest.mark.slow  # trains the smoke testbed
def test_ancestor_benchmark_smoke(smoke_testbed):
    table = rows(ancestor.run("smoke", 500, cache_dir=str(smoke_testbed.root.parent)))
    for label in ("MoE attention + ancestor MLP", "MoE attention + mean MLP", "MoE attention + stock_inverse MLP"):
        assert float(table[label][-1]) > 0.5, label
    assert 0 < float(table["mean"][1]) <= 1  # cosine to the ancestor


def test_prune_benchmark_covers_every_score_at_every_fraction(monkeypatch):
    """Every score `prune_experts` takes, with and without the re-fit, at each `--fractions` size;
    the rows without the re-fit say so (the smaller-MoE methods re-fit by default)."""
    from typing import get_args

    from mergekit_moe2dense.methods.prune_experts import Saliency

    assert prune.sizes(64, (0.5, 0.25)) == [32, 16] and prune.sizes(8, prune.FRACTIONS) == [6, 4]
    found = {v.label: v.parameters for v in prune.variants(64, 8, True, (0.5, 0.25))}
    for n in (32, 16):
        for s in get_args(Saliency):
            assert found[f"prune {n} by {s}"] == {"num_experts": n, "score": s, "refit": "none"}
            assert found[f"prune {n} by {s} + refit"]["refit"] == "down_proj"
        assert found[f"merge {n} by outputs, align weights"]["refit"] == "none"
        assert found[f"merge {n} by outputs, align weights + refit"]["refit"] == "down_proj"

    seen = {}
    monkeypatch.setattr(prune, "run", lambda *args, **kw: seen.update(kw) or "")
    prune.main(["--preset", "smoke", "--fractions", "0.5,0.25"])
    assert seen["fractions"] == [0.5, 0.25]
