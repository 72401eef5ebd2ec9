# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The smoke testbed builds, learns, caches, and reports sane drift statistics."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, MixtralForCausalLM

from benchmarks import testbed as recipe
from benchmarks.testbed import (
    DOMAINS,
    PRESETS,
    build_testbed,
    expert_drift,
    split_of,
)
from helpers import tiny_mixtral_config

PRESET = PRESETS["smoke"]


@pytest.fixture(scope="module")
def testbed(smoke_testbed):
    return smoke_testbed  # trained once per test run: every test that uses it is marked slow


def test_expert_drift_is_one_for_copies_of_the_ancestor_and_minus_one_for_negated_experts():
    """Layer 0: expert 0 the ancestor's MLP, expert 1 its negation (pairwise -1, to the ancestor
    1 and -1: mean 0); layer 1: both copies (1 and 1). A flattening that pairs the experts'
    gate, up and down with other parts of the ancestor's MLP gives other figures."""
    torch.manual_seed(0)
    config = tiny_mixtral_config(64, num_local_experts=2)
    moe = MixtralForCausalLM(config)
    dense = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    ancestor = MistralForCausalLM(MistralConfig(**dense, num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for layer, (moe_layer, dense_layer) in enumerate(zip(moe.model.layers, ancestor.model.layers)):
            mlp, experts = dense_layer.mlp, moe_layer.mlp.experts
            experts.gate_up_proj[:] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            experts.down_proj[:] = mlp.down_proj.weight
            if layer == 0:
                experts.gate_up_proj[1].neg_()
                experts.down_proj[1].neg_()
    drift = expert_drift(moe, ancestor)
    assert drift["expert_pairwise_cosine"] == pytest.approx([-1, 1], abs=1e-5)
    assert drift["expert_to_ancestor_cosine"] == pytest.approx([0, 1], abs=1e-5)


@pytest.mark.slow
def test_models_load_offline(testbed):
    expected = {"ancestor": "MistralForCausalLM", "moe": "MixtralForCausalLM", "twin": "MistralForCausalLM"}
    for name, arch in expected.items():
        path = getattr(testbed, name)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert type(model).__name__ == arch
        assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
        assert model.config.bos_token_id == tokenizer.bos_token_id
        assert model.config.eos_token_id == tokenizer.eos_token_id
        assert model.config.pad_token_id == tokenizer.pad_token_id
    moe = AutoModelForCausalLM.from_pretrained(testbed.moe)
    assert moe.config.num_local_experts == PRESET.num_experts
    assert moe.config.num_experts_per_tok == PRESET.experts_per_token


@pytest.mark.slow
def test_models_learned(testbed):
    vocab = testbed.report["vocab_size"]
    for name, by_domain in testbed.report["perplexity"].items():
        for domain, ppl in by_domain.items():
            assert ppl < 0.5 * vocab, (name, domain, ppl)


@pytest.mark.slow
def test_split_files_written(testbed):
    for folder in (testbed.calib_dir, testbed.test_dir):
        assert sorted(p.name for p in folder.glob("*.txt")) == sorted(f"{d}.txt" for d in DOMAINS)
        assert all(p.read_text().strip() for p in folder.glob("*.txt"))


@pytest.mark.slow
def test_splits_are_disjoint_by_document(testbed):
    names = json.loads((testbed.root / "data" / "documents.json").read_text())
    for domain in DOMAINS:
        sets = {split: set(names[split][domain]) for split in names}
        assert all(sets.values()), domain
        assert not sets["train"] & sets["calib"]
        assert not sets["train"] & sets["test"]
        assert not sets["calib"] & sets["test"]
        assert all(split_of(domain, n) == split for split in sets for n in sets[split])


@pytest.mark.slow
def test_second_call_hits_cache(testbed, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a cached testbed was built again")

    monkeypatch.setattr(recipe, "_build", no_build)
    monkeypatch.setattr(recipe, "train", no_build)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in testbed.root.rglob("*")}
    again = build_testbed("smoke", cache_dir=testbed.root.parent)
    assert again == testbed
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in testbed.root.rglob("*")} == before
    assert not [p for p in testbed.root.parent.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_report_drift(testbed):
    """The reported drift is that of the saved MoE and ancestor, one figure per layer."""
    drift = testbed.report["drift"]
    recomputed = expert_drift(
        AutoModelForCausalLM.from_pretrained(testbed.moe), AutoModelForCausalLM.from_pretrained(testbed.ancestor)
    )
    for key in ("expert_pairwise_cosine", "expert_to_ancestor_cosine"):
        assert len(drift[key]) == PRESET.num_layers
        assert drift[key] == pytest.approx(recomputed[key], abs=1e-4), key
    for layers in testbed.report["router_frequency"].values():
        for freq in layers:
            assert len(freq) == PRESET.num_experts
            assert sum(freq) == pytest.approx(1.0)
