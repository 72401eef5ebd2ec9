# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Testbed presets without training: the recorded training tokens, the recipe hash, the
fine-grained presets' configs and their auxiliary-loss-free balancing."""

import dataclasses

import pytest
import torch
from transformers import Glm4MoeForCausalLM

from benchmarks.testbed import (
    HASH_OPTIONAL_FIELDS,
    PRESETS,
    SCRATCH_FAMILIES,
    BiasBalancer,
    Preset,
    SelectionCounter,
    ancestor_config,
    balanced_bias,
    bias_routers,
    load_spread,
    recipe_hash,
    recorded_preset,
    training_tokens,
)


def test_training_tokens_per_preset():
    assert training_tokens(PRESETS["scratch-hard"]) == {"moe": 6_144_000, "twin": 6_144_000}
    example = training_tokens(PRESETS["example"])  # upcycled: the MoE and twin continue the ancestor
    per_step = 12 * 128
    assert example == {
        "ancestor": 300 * per_step,
        "moe_after_ancestor": 150 * per_step,
        "moe": 450 * per_step,
        "twin": 450 * per_step,
    }


def test_mix_enters_the_recipe_hash_only_when_not_balanced():
    scratch = PRESETS["scratch"]
    assert recipe_hash(dataclasses.replace(scratch, mix="balanced")) == recipe_hash(scratch)
    assert recipe_hash(dataclasses.replace(scratch, mix="proportional")) != recipe_hash(scratch)


def test_the_downstream_preset_has_a_head_size_vllm_cpu_takes():
    # vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... (scripts/downstream_check.sh)
    preset = PRESETS["downstream"]
    assert preset.hidden_size // preset.num_heads in (32, 64, 80, 96, 112, 128)
    assert preset.num_heads % preset.num_kv_heads == 0


FINE = ("fine-qwen3", "fine-glm", "fine-qwen3-smoke", "fine-glm-smoke")


class _Tokenizer:
    """What the model configs read from a tokenizer: its size and special token ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __len__(self):
        return 384


def _configs(name):
    preset = PRESETS[name]
    make_configs = SCRATCH_FAMILIES[preset.family][0]
    return preset, *make_configs(preset, ancestor_config(preset, _Tokenizer()))


def test_the_routing_fields_enter_the_recipe_hash_only_away_from_their_defaults():
    scratch = PRESETS["scratch"]
    for key, default in HASH_OPTIONAL_FIELDS.items():
        assert getattr(scratch, key) == default or key == "family"
    assert recipe_hash(dataclasses.replace(scratch, shared_experts=0, bias_update_rate=0.0)) == recipe_hash(scratch)
    assert recipe_hash(dataclasses.replace(scratch, bias_update_rate=1e-3)) != recipe_hash(scratch)
    assert len({recipe_hash(PRESETS[name]) for name in FINE}) == len(FINE)


@pytest.mark.parametrize("name", FINE)
def test_fine_grained_presets_have_64_experts_top_8_and_twins_of_the_active_width(name):
    preset, moe, twin = _configs(name)
    assert (preset.num_experts, preset.experts_per_token, preset.ancestor_steps) == (64, 8, 0)
    if preset.family == "qwen3_moe":
        assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (64, 8, True)
        assert moe.mlp_only_layers == [] and moe.decoder_sparse_step == 1
        assert twin.intermediate_size == 8 * preset.intermediate_size
        return
    assert (moe.n_routed_experts, moe.num_experts_per_tok, moe.n_shared_experts) == (64, 8, 1)
    assert moe.norm_topk_prob and moe.routed_scaling_factor == 2.5 and moe.first_k_dense_replace == 1
    assert preset.aux_loss_coef == 0 and preset.bias_update_rate > 0  # balanced by the bias alone
    active = (8 + 1) * preset.intermediate_size
    assert moe.intermediate_size == twin.intermediate_size == active  # the dense first layer too
    assert twin.first_k_dense_replace == twin.num_hidden_layers == preset.num_layers
    assert moe.moe_intermediate_size == preset.intermediate_size


def test_the_aux_loss_free_update_raises_idle_experts_and_lowers_busy_ones():
    bias = torch.tensor([0.5, 0.0, 0.0, 0.0])
    counts = torch.tensor([3, 1, 2, 2])  # mean 2
    assert balanced_bias(bias, counts, 0.1).tolist() == pytest.approx([0.4, 0.1, 0.0, 0.0])


def test_the_bias_balancer_evens_out_a_router_that_favours_some_experts():
    """A bias that sends every token to experts 0-7 is pulled back by the balancer's updates
    (forward passes only: the bias is the only thing that changes), and its hooks go with it."""
    torch.manual_seed(0)
    preset, config, _ = _configs("fine-glm-smoke")
    model = Glm4MoeForCausalLM(config).eval()
    ids = torch.randint(3, 384, (4, 32))
    for router in bias_routers(model):
        router.e_score_correction_bias[:8] = 0.5

    def spread():
        with SelectionCounter(model) as counter:
            model(input_ids=ids)
        return [load_spread(freq) for freq in counter.frequencies()]

    before = spread()
    with torch.no_grad(), BiasBalancer(model, rate=0.02) as balancer:
        for _ in range(40):
            model(input_ids=ids)
            balancer.step()
    assert all(not router._forward_hooks for router in bias_routers(model))
    after = spread()
    assert len(before) == preset.num_layers - preset.first_dense_layers
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    assert all(router.e_score_correction_bias[:8].max() < 0.5 for router in bias_routers(model))


@pytest.mark.parametrize("name", ["scratch", "fine-glm"])
def test_reports_record_the_routing_fields_only_away_from_their_defaults(name):
    preset = PRESETS[name]
    recorded = recorded_preset(preset)
    assert Preset(**recorded) == preset  # what a cached report is read back with
    assert ("bias_update_rate" in recorded) == (preset.family == "glm4_moe")
