# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The smoke testbed builds, learns, caches, and reports sane drift statistics."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import testbed as recipe
from benchmarks.testbed import (
    DOMAINS,
    PRESETS,
    build_testbed,
    split_of,
)

# trains the smoke testbed (once per session)
pytestmark = pytest.mark.slow

PRESET = PRESETS["smoke"]


@pytest.fixture(scope="module")
def testbed(smoke_testbed):
    return smoke_testbed


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


def test_models_learned(testbed):
    vocab = testbed.report["vocab_size"]
    for name, by_domain in testbed.report["perplexity"].items():
        for domain, ppl in by_domain.items():
            assert ppl < 0.5 * vocab, (name, domain, ppl)


def test_split_files_written(testbed):
    for folder in (testbed.calib_dir, testbed.test_dir):
        assert sorted(p.name for p in folder.glob("*.txt")) == sorted(f"{d}.txt" for d in DOMAINS)
        assert all(p.read_text().strip() for p in folder.glob("*.txt"))


def test_splits_are_disjoint_by_document(testbed):
    names = json.loads((testbed.root / "data" / "documents.json").read_text())
    for domain in DOMAINS:
        sets = {split: set(names[split][domain]) for split in names}
        assert all(sets.values()), domain
        assert not sets["train"] & sets["calib"]
        assert not sets["train"] & sets["test"]
        assert not sets["calib"] & sets["test"]
        assert all(split_of(domain, n) == split for split in sets for n in sets[split])


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


def test_report_drift(testbed):
    drift = testbed.report["drift"]
    for key in ("expert_pairwise_cosine", "expert_to_ancestor_cosine"):
        assert len(drift[key]) == PRESET.num_layers
        assert all(-1 <= v <= 1 for v in drift[key]), key
    for layers in testbed.report["router_frequency"].values():
        for freq in layers:
            assert len(freq) == PRESET.num_experts
            assert sum(freq) == pytest.approx(1.0)
