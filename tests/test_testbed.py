"""The smoke testbed builds, learns, caches, and reports sane drift statistics."""

import json
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.testbed import (
    DOMAINS,
    PRESETS,
    build_testbed,
    split_of,
)

PRESET = PRESETS["smoke"]


@pytest.fixture(scope="module")
def testbed(smoke_testbed):
    return smoke_testbed


def test_models_load_offline(testbed):
    expected = {
        "ancestor": "MistralForCausalLM", "moe": "MixtralForCausalLM", "twin": "MistralForCausalLM"
    }
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


def test_second_call_hits_cache(testbed):
    start = time.time()
    again = build_testbed("smoke", cache_dir=testbed.root.parent)
    assert time.time() - start < 2
    assert again == testbed
    assert not [p for p in testbed.root.parent.iterdir() if ".partial-" in p.name]


def test_report_drift(testbed):
    drift = testbed.report["drift"]
    for key in ("expert_pairwise_cosine", "expert_to_ancestor_cosine"):
        assert len(drift[key]) == PRESET.num_layers
        assert all(-1 <= v <= 1 for v in drift[key]), key
    for domain, layers in testbed.report["router_frequency"].items():
        for freq in layers:
            assert len(freq) == PRESET.num_experts
            assert sum(freq) == pytest.approx(1.0)
