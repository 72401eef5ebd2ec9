# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The `scratch-smoke` preset: a Qwen3-MoE trained from random init (no ancestor) and a dense
Qwen3 twin of its active size, both of which learned the data."""

import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.testbed import PRESETS, build_testbed, encode, perplexity

# trains a tiny MoE and its dense twin
pytestmark = pytest.mark.slow

PRESET = PRESETS["scratch-smoke"]


def test_scratch_smoke_builds_a_trained_qwen3_moe(tmp_path):
    testbed = build_testbed("scratch-smoke", cache_dir=tmp_path)
    assert testbed.ancestor is None and not (testbed.root / "ancestor").exists()
    assert "ancestor" not in testbed.report["perplexity"]

    moe = AutoModelForCausalLM.from_pretrained(testbed.moe)
    twin = AutoModelForCausalLM.from_pretrained(testbed.twin)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    assert type(twin).__name__ == "Qwen3ForCausalLM"
    config = moe.config
    assert (config.num_experts, config.num_experts_per_tok) == (PRESET.num_experts, PRESET.experts_per_token)
    assert config.norm_topk_prob and config.decoder_sparse_step == 1 and config.mlp_only_layers == []
    assert config.moe_intermediate_size == PRESET.intermediate_size
    assert twin.config.intermediate_size == PRESET.experts_per_token * PRESET.intermediate_size

    # Learned: the reloaded MoE scores the test split far below a uniform guess over the
    # vocabulary, and as the report says (the checkpoint is the trained model).
    tokenizer = AutoTokenizer.from_pretrained(testbed.moe)
    ids = encode(tokenizer, (testbed.test_dir / "code.txt").read_text())[: 20 * PRESET.seq_len]
    ppl = perplexity(moe, ids, PRESET.seq_len)
    assert ppl < 0.25 * len(tokenizer)
    untrained = perplexity(type(moe)(config).eval(), ids, PRESET.seq_len)
    assert ppl < 0.5 * untrained
    for by_domain in testbed.report["perplexity"].values():
        assert all(p < 0.25 * len(tokenizer) for p in by_domain.values())

    # No common ancestor: experts are far from copies of each other (upcycled ones start at ~1),
    # and the load-balancing loss keeps every expert in use.
    assert all(abs(c) < 0.3 for c in testbed.report["drift"]["expert_pairwise_cosine"])
    assert "expert_to_ancestor_cosine" not in testbed.report["drift"]
    for layers in testbed.report["router_frequency"].values():
        for freq in layers:
            assert math.isclose(sum(freq), 1.0, rel_tol=1e-5)
            assert min(freq) > 0.02
