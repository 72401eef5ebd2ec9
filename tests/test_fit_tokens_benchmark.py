# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The fit-tokens benchmark runs end to end on the fine-grained smoke testbed, with a row per
calibration variant (dense and pruned) and ratios that are the printed perplexities'."""

import pytest

from benchmarks import fit_tokens


def test_balanced_split_caps_each_domain(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for domain, size in (("c", 50), ("code", 500), ("docs", 20)):
        (train / f"{domain}.txt").write_text("x" * size)
    out = fit_tokens.balanced_split(train, tmp_path / "balanced", 100)
    assert {p.name: len(p.read_text()) for p in out.iterdir()} == {"c.txt": 50, "code.txt": 100, "docs.txt": 20}


@pytest.mark.slow  # trains the fine-grained smoke testbed
def test_fit_tokens_benchmark_smoke(tmp_path):
    report, rows = fit_tokens.run(
        "fine-qwen3-smoke",
        fit_tokens.SMOKE_VARIANTS,
        work_dir=str(tmp_path / "work"),
        cache_dir=str(tmp_path / "cache"),
        balance_chars=20_000,
    )
    labels = [label for label, _ in rows]
    assert labels == ["MoE", "dense twin"] + [v.label(8) for v in fit_tokens.SMOKE_VARIANTS]
    assert labels[-1] == "prune half by reap, refit down_proj, on the train text, 32 pieces"
    moe = rows[0][1].perplexity
    table = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for label, result in rows:
        assert set(result.per_source) == {"c", "code", "docs"}
        assert float(table[label].split("|")[-2]) == pytest.approx(result.perplexity / moe, abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "work" / "balanced").iterdir()) == ["c.txt", "code.txt", "docs.txt"]
