# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`benchmarks/heal.py --smoke` runs end to end on the smoke testbed: every heal fraction, both
collapses (exact: no refusal) and the throughput comparison have their rows."""

import pytest

from benchmarks import heal


@pytest.mark.slow  # trains the smoke testbed, heals and collapses
def test_heal_benchmark_smoke(tmp_path, capsys):
    heal.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work")])
    report = capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for label in ("MoE (teacher)", "dense twin", "heal 1% of refit: fit", "heal 5% of refit: fit"):
        assert any(label in row for row in rows), label
    assert sum("collapse 5%" in row for row in rows) == 2
    assert "plain transformers loop" in report and "benchmark time" in report
