# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`collapse`: training with a penalty on the experts' spread, then an exact conversion."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import assert_one_line_error, logits_of, make_mixtral, run_cli
from mergekit_moe2dense.heal.collapse import CollapsePenalty, expert_deviation

SEQ = 32


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
    record = json.loads((out / "collapse.json").read_text())
    assert record["expert_spread_before"] > 0.1 and record["expert_spread_after"] < 1e-12 and record["exact"]
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
