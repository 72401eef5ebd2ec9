# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`collapse`: training with a penalty on the experts' spread, then an exact conversion."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import transformers

from helpers import assert_one_line_error, dead_pid, logits_of, make_mixtral, run_cli, state_of
from mergekit_moe2dense.training import CollapseSettings, TrainSettings
from mergekit_moe2dense.training.collapse import SPREAD_TOLERANCE, CollapsePenalty, collapse, expert_deviation

SEQ = 32


def short_run(calib_dir):
    """One optimiser step: enough to see what a run writes and refuses."""
    return ("--data", calib_dir, "--max-tokens", 2 * SEQ, "--seq-len", SEQ, "--batch-size", 2, "--lr", 1e-3, "--quiet")


def _strict(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def moe(tmp_path_factory, tokenizer_dir):
    return make_mixtral(tmp_path_factory.mktemp("collapse") / "moe", tokenizer_dir, seed=4)


def test_penalty_schedules_rise_to_the_maximum():
    w = torch.randn(4, 3, 5)
    for schedule in ("linear", "exponential"):
        penalty = CollapsePenalty([w], penalty_max=100.0, schedule=schedule, steps=10, lr=1e-3)
        values = [penalty.strength(step) for step in range(1, 11)]
        assert values == sorted(values) and values[0] < values[-1] == 100.0
    assert CollapsePenalty([w], penalty_max=5.0, schedule="constant", steps=10, lr=1e-3).strength(1) == 5.0


def test_proximal_step_keeps_the_mean_and_shrinks_the_spread():
    w = torch.randn(4, 3, 5)
    mean = w.mean(0).clone()
    spread = expert_deviation([w])[0]
    penalty = CollapsePenalty([w], penalty_max=10.0, schedule="constant", steps=1, lr=0.1)
    penalty.on_optimizer_step(None, type("State", (), {"global_step": 0})(), None)
    assert torch.allclose(w.mean(0), mean, atol=1e-6)
    assert expert_deviation([w])[0] == pytest.approx(spread / (1 + 2 * 0.1 * 10.0) ** 2, rel=1e-5)


@pytest.mark.slow
def test_large_penalty_collapses_the_experts_and_the_conversion_is_exact(moe, tmp_path, calib_dir):
    out, collapsed = tmp_path / "dense", tmp_path / "collapsed"
    result = run_cli(
        "collapse", moe, out, "--data", calib_dir, "--max-tokens", 6 * 2 * SEQ, "--seq-len", SEQ,
        "--batch-size", 2, "--lr", 1e-3, "--penalty-max", 1e6, "--save-moe", collapsed, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    experts = transformers.AutoModelForCausalLM.from_pretrained(collapsed, dtype=torch.float32)
    tensors = [
        t for layer in experts.model.layers for t in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
    ]
    assert expert_deviation(tensors)[1] < 1e-12
    original = transformers.AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    assert not torch.equal(
        original.model.layers[0].mlp.experts.down_proj, experts.model.layers[0].mlp.experts.down_proj
    )
    ids = torch.tensor([[1, 5, 9, 30, 7, 100, 42, 3, 8, 250, 17, 61]])
    assert torch.allclose(logits_of(out, ids), logits_of(collapsed, ids), atol=1e-4)
    record = _strict((out / "collapse.json").read_text())
    assert record["expert_spread_before"] > 0.1 and record["expert_spread_after"] < 1e-12 and record["exact"]
    assert record["spread_tolerance"] == SPREAD_TOLERANCE and record["collapsed"]
    assert "## Collapse" in (out / "README.md").read_text()


def test_collapse_refuses_a_dense_model_and_bad_settings(moe, tmp_path, calib_dir):
    dense = tmp_path / "dense"
    config = transformers.MistralConfig(vocab_size=300, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    transformers.MistralForCausalLM(config).save_pretrained(dense)
    common = ("--data", calib_dir, "--max-tokens", 64, "--seq-len", SEQ)
    assert_one_line_error(run_cli("collapse", dense, tmp_path / "o", *common), "is not a Mixture-of-Experts model")
    assert_one_line_error(
        run_cli("collapse", moe, tmp_path / "o", *common, "--penalty-max", 0), "--penalty-max must be positive"
    )
    assert_one_line_error(
        run_cli("collapse", moe, tmp_path / "o", "--data", calib_dir, "--max-tokens", 0), "--max-tokens"
    )
    assert_one_line_error(run_cli("collapse", moe, moe / "o", *common), "is inside the MoE")


def test_experts_that_did_not_collapse_are_refused_and_nothing_is_written(moe, tmp_path, calib_dir):
    result = run_cli("collapse", moe, tmp_path / "out", *short_run(calib_dir), "--penalty-max", 1e-9)
    assert_one_line_error(
        result,
        r"the experts did not collapse: relative spread 0\.\d+ after training .* above "
        + re.escape(f"{SPREAD_TOLERANCE:.2g}")
        + r", the tolerance for an exact conversion; raise --penalty-max \(was 1e-09\) or --max-tokens, or pass --allow-inexact",
    )
    assert list(tmp_path.iterdir()) == []  # no OUT, lock or working directory


def test_refused_collapse_keeps_the_trained_moe_where_save_moe_asks(moe, tmp_path, calib_dir):
    kept = tmp_path / "kept"
    result = run_cli(
        "collapse", moe, tmp_path / "out", *short_run(calib_dir), "--penalty-max", 1e-9, "--save-moe", kept
    )
    assert_one_line_error(result, f"the experts did not collapse: .*; the trained MoE is in {kept}$")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    trained, original = state_of(kept), state_of(moe)
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[name], original[name]) for name in original)  # the step's result


def test_allow_inexact_writes_the_dense_model_recorded_as_not_exact(moe, tmp_path, calib_dir):
    out = tmp_path / "out"
    result = run_cli("collapse", moe, out, *short_run(calib_dir), "--penalty-max", 1e-9, "--allow-inexact")
    assert result.exit_code == 0, result.output
    assert "NOT exact" in result.output
    record = _strict((out / "collapse.json").read_text())
    assert record["expert_spread_after"] > 0.1 and record["spread_tolerance"] == SPREAD_TOLERANCE
    assert record["collapsed"] is False and record["exact"] is False
    assert "**Not exact**: the spread is above the tolerance" in (out / "README.md").read_text()


def test_record_is_strict_json_when_a_value_is_not_finite(moe, tmp_path, calib_dir):
    out = tmp_path / "out"
    result = run_cli("collapse", moe, out, *short_run(calib_dir), "--penalty-max", "inf")
    assert result.exit_code == 0, result.output
    record = _strict((out / "collapse.json").read_text())
    assert record["penalty_max"] == "Infinity"
    # an infinite penalty replaces every expert by the experts' mean at each step: collapsed exactly
    assert record["expert_spread_after"] == 0.0 and record["exact"] is True
    assert "this dense model computes what the trained MoE does" in (out / "README.md").read_text()


def test_working_directory_is_named_with_the_pid_and_dead_ones_are_removed(moe, tmp_path, calib_dir):
    stale, live = tmp_path / f"out.collapse-{dead_pid()}", tmp_path / f"out.collapse-{os.getppid()}"
    for directory in (stale, live):
        (directory / "moe").mkdir(parents=True)
    seen = []

    class Look(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.extend(sorted(p.name for p in tmp_path.iterdir()))

    settings = TrainSettings(max_tokens=2 * SEQ, seq_len=SEQ, batch_size=2, lr=1e-3)
    collapse(CollapseSettings(moe=str(moe), data=str(calib_dir), training=settings, penalty_max=float("inf")),
             str(tmp_path / "out"), callbacks=[Look()], progress=False)  # fmt: skip
    pid = os.getpid()
    assert seen == sorted([f"out.collapse-{pid}", live.name, f"out.incomplete-{pid}", "out.lock"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


@pytest.mark.parametrize("where", ["OUT", "inside OUT", "containing OUT", "the MoE"])
def test_save_moe_may_not_be_out_or_overlap_it_or_the_moe(moe, tmp_path, calib_dir, where):
    out = tmp_path / "dense"
    save_moe = {"OUT": out, "inside OUT": out / "moe", "containing OUT": tmp_path, "the MoE": moe}[where]
    result = run_cli("collapse", moe, out, *short_run(calib_dir), "--save-moe", save_moe)
    assert_one_line_error(
        result, f"--save-moe directory {save_moe} overlaps {'the MoE' if where == 'the MoE' else 'OUT'}"
    )
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_of_the_moe_is_one_line_before_training(moe, tmp_path, calib_dir):
    broken = tmp_path / "moe"
    shutil.copytree(moe, broken)
    shard = broken / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    result = run_cli("collapse", broken, tmp_path / "out", *short_run(calib_dir))
    assert_one_line_error(result, f"MoE {broken}: shard {shard} is truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
