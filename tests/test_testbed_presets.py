# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Testbed presets without training: the recorded training tokens and the recipe hash."""

import dataclasses

from benchmarks.testbed import PRESETS, recipe_hash, training_tokens


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
