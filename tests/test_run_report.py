# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What a conversion tells its user: `--dry-run` says what would be done and writes nothing,
a finished run ends with a summary and the `eval` command, and `eval` ends with a verdict."""

from __future__ import annotations

import shlex

from helpers import run_cli, write_config
from mergekit_moe2dense import build, calibration
from mergekit_moe2dense.evaluation import verdict_line


def test_dry_run_prints_the_plan_and_writes_nothing(random_moe, calib_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run calibrated")

    monkeypatch.setattr(build, "collect_statistics", refuse)
    monkeypatch.setattr(calibration, "collect_statistics", refuse)
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, refit="down_proj")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no lock, no staging
    out = result.output
    assert "Dry run: nothing was written." in out and "method: router_weighted" in out
    assert "refit=down_proj" in out and f"calibration: {6 * 32} tokens" in out
    assert "output: a dense model (MistralForCausalLM)" in out and "parameters" in out and "on disk" in out
    assert "estimate for this machine: ~" in out and "peak memory ~" in out


def test_a_run_ends_with_a_summary_and_the_eval_command(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, refit="down_proj")
    out = tmp_path / "out"
    result = run_cli(config, out)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "output: a dense model (MistralForCausalLM)" in text and "parameters" in text
    assert "re-fit, layer 0: relative error" in text and "re-fit, layer 1: relative error" in text
    assert "time: " in text
    assert "the inspect verdict was ignored" in text  # router_weighted on this MoE's unrelated experts
    command = text.split("compare it with the MoE: ")[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[:4] == ["mergekit-moe2dense", "eval", str(random_moe["legacy"]), str(out)]
    assert words[4:] == ["--data", str(calib_dir), "--seq-len", "32"]


def test_eval_ends_with_the_quickstart_verdict_and_adds_the_results_to_the_card(random_moe, calib_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli(write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir), out).exit_code == 0
    moe = random_moe["legacy"]
    result = run_cli("eval", moe, out, "--data", calib_dir, "--seq-len", 32, "--max-tokens", 64, "--card", out)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("verdict: the model has ") and "perplexity vs the MoE (ratio " in last
    card = (out / "README.md").read_text()
    section = card.split("## Evaluation")[1]
    assert f"| `{moe.name}` |" in section and f"| `{out.name}` |" in section and "| 1.0000 |" in section
    assert str(tmp_path) not in card


def test_verdict_line_grades_the_ratio():
    assert verdict_line(10.0, 10.4).endswith(": close to the MoE")
    assert verdict_line(10.0, 11.5).endswith(": usable") and verdict_line(10.0, 13.0).endswith(": far from the MoE")


def test_eval_card_needs_a_model_card(random_moe, calib_dir, tmp_path):
    result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--card", tmp_path)
    assert result.exit_code == 1 and "no README.md there" in result.output
