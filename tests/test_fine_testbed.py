# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The fine-grained smoke testbeds: a Qwen3-MoE and a GLM-4.5-style MoE of 64 experts, top-8,
trained from scratch with dense twins of their active width, and converted by the plugin."""

from __future__ import annotations

import pytest
import torch
import transformers
from mergekit.options import MergeOptions

from benchmarks.testbed import PRESETS, build_testbed
from helpers import make_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.families import get_family

SMOKE = ("fine-qwen3-smoke", "fine-glm-smoke")


@pytest.fixture(scope="module")
def testbeds(tmp_path_factory):
    """Both smoke testbeds, built once for this module (seconds each)."""
    root = tmp_path_factory.mktemp("fine-testbeds")
    return {name: build_testbed(name, cache_dir=root) for name in SMOKE}


def _models(testbed):
    load = transformers.AutoModelForCausalLM.from_pretrained
    return load(testbed.moe), load(testbed.twin)


def test_the_qwen3_smoke_moe_routes_64_experts_top_8_with_renormalised_weights(testbeds):
    preset = PRESETS["fine-qwen3-smoke"]
    moe, twin = _models(testbeds["fine-qwen3-smoke"])
    assert (type(moe).__name__, type(twin).__name__) == ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")
    config = moe.config
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (64, 8, True)
    assert config.mlp_only_layers == [] and config.moe_intermediate_size == preset.intermediate_size
    assert twin.config.intermediate_size == 8 * preset.intermediate_size
    assert testbeds["fine-qwen3-smoke"].ancestor is None


def test_the_glm_smoke_moe_has_deepseek_v3_routing_a_shared_expert_and_a_dense_first_layer(testbeds):
    preset = PRESETS["fine-glm-smoke"]
    moe, twin = _models(testbeds["fine-glm-smoke"])
    assert type(moe).__name__ == type(twin).__name__ == "Glm4MoeForCausalLM"
    config = moe.config
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (64, 8, 1)
    assert config.routed_scaling_factor == 2.5 and config.norm_topk_prob and config.first_k_dense_replace == 1
    assert not hasattr(moe.model.layers[0].mlp, "experts")  # dense first layer
    assert moe.model.layers[0].mlp.gate_proj.out_features == (8 + 1) * preset.intermediate_size
    # the twin: every layer dense, of the MoE's active width (top-k + shared) x expert width
    assert twin.config.first_k_dense_replace == twin.config.num_hidden_layers
    assert all(layer.mlp.gate_proj.out_features == 9 * preset.intermediate_size for layer in twin.model.layers)

    # Sigmoid scores, renormalised over the top 8 and scaled; the bias steers the choice only.
    gate = moe.model.layers[1].mlp.gate
    hidden = torch.randn(5, config.hidden_size)
    logits, weights, chosen = gate(hidden)
    expected = logits.sigmoid().gather(1, chosen)
    torch.testing.assert_close(weights, 2.5 * expected / expected.sum(-1, keepdim=True))
    assert gate.e_score_correction_bias.abs().max() > 0  # trained, and saved with the checkpoint


def test_the_glm_balancing_bias_evens_out_the_load_it_was_trained_against(testbeds):
    """Without the bias the same router sends more tokens to some experts; the learned bias is
    lowest on those (negative correlation) and its choice is more even."""
    balance = testbeds["fine-glm-smoke"].report["bias_balance"]
    assert len(balance["bias"]) == PRESETS["fine-glm-smoke"].num_layers - 1
    for layer, bias in enumerate(balance["bias"]):
        assert balance["spread_with_bias"][layer] < balance["spread_without_bias"][layer]
        load = torch.tensor(balance["frequency_without_bias"][layer])
        assert torch.corrcoef(torch.stack([torch.tensor(bias), load]))[0, 1] < -0.3


@pytest.mark.parametrize("name", SMOKE)
def test_the_smoke_models_learned(testbeds, name):
    report = testbeds[name].report
    for model, by_domain in report["perplexity"].items():
        assert all(ppl < 0.7 * report["vocab_size"] for ppl in by_domain.values()), (model, by_domain)
    for layers in report["router_frequency"].values():
        assert all(sum(freq) == pytest.approx(1.0) and len(freq) == 64 for freq in layers)


@pytest.mark.parametrize(
    "name,target", [("fine-qwen3-smoke", "Qwen3ForCausalLM"), ("fine-glm-smoke", "Glm4MoeForCausalLM")]
)
def test_the_plugin_converts_the_smoke_moes(testbeds, tmp_path, name, target):
    testbed = testbeds[name]
    config = transformers.AutoConfig.from_pretrained(testbed.moe)
    assert get_family(config).name == config.model_type
    out = tmp_path / "dense"
    method = make_config(testbed.moe, "concat", testbed.calib_dir, num_experts=8)
    build_dense(method, str(out), MergeOptions(quiet=True))
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(dense).__name__ == target
    ids = torch.randint(3, 300, (1, 16))
    assert torch.isfinite(dense(input_ids=ids).logits).all()
