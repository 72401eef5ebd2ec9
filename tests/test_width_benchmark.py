# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The width benchmark runs end to end on the fine-grained smoke testbed, and its table is
consistent: parameter counts grow with the width, ratios are the printed perplexities'."""

import pytest

from benchmarks import width
from benchmarks.testbed import PRESETS


def table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: row[1:] for row in cells[1:]}


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow  # trains the fine-grained smoke testbed
def test_width_benchmark_smoke(tmp_path):
    plot = tmp_path / "width.png"
    report, rows = width.run(
        "fine-qwen3-smoke",
        max_tokens=width.SMOKE["max_tokens"],
        num_samples=width.SMOKE["num_samples"],
        work_dir=str(tmp_path / "work"),
        cache_dir=str(tmp_path / "cache"),
        plot=str(plot),
    )
    preset = PRESETS["fine-qwen3-smoke"]
    k, experts = preset.experts_per_token, preset.num_experts
    header, by_label = table(report)
    column = {name: i - 1 for i, name in enumerate(header)}  # the label is the row's key
    cell = lambda label, name: number(by_label[label][column[name]])  # noqa: E731

    ms = width.widths(width.WIDTHS, k, experts)
    assert ms[0] == k and ms[-1] == experts
    moe, twin = f"MoE ({experts} experts, top-{k})", "dense twin"
    assert list(by_label) == [moe, twin] + [
        f"concat m={m}" + suffix for m in ms for suffix in ("", ", `refit: down_proj`")
    ]

    # parameters: a dense model's active counts are its counts; the MoE's active ones hold k of E experts
    for label in by_label:
        if label != moe:
            assert cell(label, "params") == cell(label, "active params"), label
            assert cell(label, "MLP params") == cell(label, "active MLP"), label
    router = preset.num_layers * experts * preset.hidden_size
    routed = preset.num_layers * experts * 3 * preset.hidden_size * preset.intermediate_size
    assert cell(moe, "MLP params") == routed + router
    assert cell(moe, "active MLP") == routed * k // experts + router
    assert cell(moe, "params") - cell(moe, "active params") == routed - routed * k // experts
    # m = k is the twin's width; every m adds whole experts; m = E is the MoE without its routers
    assert cell(f"concat m={k}", "params") == cell(twin, "params")
    expert = preset.num_layers * 3 * preset.hidden_size * preset.intermediate_size
    for suffix in ("", ", `refit: down_proj`"):
        for small, large in zip(ms, ms[1:]):
            grown = cell(f"concat m={large}{suffix}", "MLP params") - cell(f"concat m={small}{suffix}", "MLP params")
            assert grown == (large - small) * expert
            assert cell(f"concat m={large}{suffix}", "params") > cell(f"concat m={small}{suffix}", "params")
    assert cell(f"concat m={experts}", "MLP params") == cell(moe, "MLP params") - router
    assert cell(f"concat m={experts}", "params") < cell(moe, "params")

    # ratios are those of the printed perplexities (to rounding); per-domain columns are there
    for label in by_label:
        ppl = cell(label, "ppl")
        assert cell(label, "ratio to MoE") == pytest.approx(ppl / cell(moe, "ppl"), abs=2e-3), label
        assert cell(label, "ratio to twin") == pytest.approx(ppl / cell(twin, "ppl"), abs=2e-3), label
        assert all(cell(label, domain) > 1 for domain in ("c", "code", "docs")), label
    assert cell(moe, "ratio to MoE") == 1.0 and cell(twin, "ratio to twin") == 1.0
    assert [r.label for r in rows] == list(by_label)
    assert "refit down_proj: best m=" in report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_flag_selects_the_fine_grained_smoke_preset(monkeypatch):
    seen = {}

    def run(preset, multiples, max_tokens, num_samples, *args):
        seen.update(preset=preset, multiples=multiples, max_tokens=max_tokens, num_samples=num_samples)
        return "", []

    monkeypatch.setattr(width, "run", run)
    width.main(["--smoke", "--widths", "1,2"])
    assert seen == {"preset": "fine-qwen3-smoke", "multiples": [1.0, 2.0], "max_tokens": 1000, "num_samples": 8}


def test_widths_are_multiples_of_top_k_capped_at_the_experts():
    assert width.widths(width.WIDTHS, 8, 64) == [8, 12, 16, 24, 32, 48, 64]
    assert width.widths((1, 2, 4), 8, 20) == [8, 16, 20]
