# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Method weights on synthetic router statistics: properties a wrong formula breaks."""

from __future__ import annotations

import mergekit.merge_methods as mergekit_methods
import pytest
import torch

from mergekit_moe2dense.calibration.stats import RouterStatistics
from mergekit_moe2dense.methods import METHODS, MethodError, get_method, register_methods
from mergekit_moe2dense.methods.top_k_tempered import tempered_top_k

E, L, K = 6, 3, 2


def synthetic_stats(tokens: int = 500, seed: int = 0) -> RouterStatistics:
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(L, 1, E, generator=generator) * 2
    logits = bias + torch.randn(L, tokens, E, generator=generator)
    stats = RouterStatistics(layers=list(range(L)), num_experts=E, top_k=K, samples=torch.zeros(L, tokens, E))
    keep = torch.ones(tokens, dtype=torch.bool)
    for layer in range(L):
        probs = torch.softmax(logits[layer], -1)
        top = probs.topk(K, -1)
        stats.update(layer, logits[layer], top.values / top.values.sum(-1, keepdim=True), top.indices, keep, torch.arange(tokens), torch.arange(tokens))
    stats.tokens = tokens
    return stats


def weights(name, stats=None, **params):
    method = get_method(name)
    resolved = method.resolve_parameters(params, num_experts=E, top_k=K)
    return method.layer_weights(stats or synthetic_stats(), resolved, num_layers=L, num_experts=E)


CASES = [
    ("router_weighted", {"aggregate": a}) for a in ("mean_logit", "mean_prob", "median_prob", "selection_frequency")
] + [
    ("top_k_tempered", {"aggregate": a, "temperature": t, "top_k": k, "renormalize": r})
    for a in ("mean", "median")
    for t in (0.1, 1.0)
    for k in (1, 2, E)
    for r in (True, False)
] + [("expert_uniform", {}), ("single_expert", {}), ("single_expert", {"expert": 3})]


@pytest.mark.parametrize("name,params", CASES)
def test_weights_are_a_distribution_per_layer(name, params):
    w = weights(name, **params)
    assert w.shape == (L, E)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(L, dtype=w.dtype))


def test_mean_logit_is_softmax_of_mean_not_of_sum():
    stats = synthetic_stats()
    w = weights("router_weighted", stats, aggregate="mean_logit", temperature=2.0)
    expected = torch.softmax(stats.samples.double().mean(1) / 2.0, -1)
    torch.testing.assert_close(w, expected)
    assert (w.max(-1).values < 0.999).all(), "softmax of summed logits would be one-hot"


def test_mean_prob_at_temperature_one_is_the_normalised_mean():
    stats = synthetic_stats()
    w = weights("router_weighted", stats, aggregate="mean_prob")
    mean = torch.softmax(stats.samples.double(), -1).mean(1)
    torch.testing.assert_close(w, mean / mean.sum(-1, keepdim=True))


@pytest.mark.parametrize("aggregate", ["mean_logit", "mean_prob", "selection_frequency"])
def test_router_weighted_temperature_to_zero_is_one_hot(aggregate):
    assert (weights("router_weighted", aggregate=aggregate, temperature=1e-4).max(-1).values > 0.999).all()


def test_top_k_tempered_temperature_to_zero_counts_top1_choices():
    # Per token the tempered softmax becomes one-hot on its top-1 expert.
    hot = weights("top_k_tempered", temperature=1e-3)
    top1 = torch.nn.functional.one_hot(synthetic_stats().samples.argmax(-1), E).double().mean(1)
    torch.testing.assert_close(hot, top1, atol=1e-3, rtol=0)


def test_large_temperature_approaches_uniform():
    w = weights("router_weighted", aggregate="mean_logit", temperature=1e6)
    torch.testing.assert_close(w, torch.full((L, E), 1 / E, dtype=w.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4, E])
def test_top_k_mask_keeps_exactly_k_per_token(k):
    logits = torch.randn(50, E)
    probs = tempered_top_k(logits, 0.7, k, renormalize=False)
    assert ((probs > 0).sum(-1) == k).all()
    renormalized = tempered_top_k(logits, 0.7, k, renormalize=True)
    torch.testing.assert_close(renormalized.sum(-1), torch.ones(50, dtype=renormalized.dtype))


def test_median_never_all_zero():
    # 6 experts, top-1, balanced routing: every expert's median is zero.
    stats = synthetic_stats()
    stats.samples = torch.randn(L, 600, E) * 0.01
    for layer in range(L):
        stats.samples[layer, torch.arange(600), torch.arange(600) % E] += 5.0
    w = weights("top_k_tempered", stats, top_k=1, aggregate="median")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, weights("top_k_tempered", stats, top_k=1, aggregate="mean"))


def test_single_expert_defaults_to_most_selected():
    stats = synthetic_stats()
    w = weights("single_expert", stats)
    assert (w.argmax(-1) == stats.selection_frequency.argmax(-1)).all()
    assert (w.max(-1).values == 1).all()


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("router_weighted", {"temperature": 0}, "temperature"),
        ("router_weighted", {"temperature": -1.0}, "temperature"),
        ("top_k_tempered", {"temperature": 0.0}, "temperature"),
        ("top_k_tempered", {"top_k": 0}, "top_k"),
        ("top_k_tempered", {"top_k": E + 1}, "out of range"),
        ("router_weighted", {"aggregate": "sum_logit"}, "aggregate"),
        ("router_weighted", {"temprature": 1.0}, "unknown parameter"),
        ("single_expert", {"expert": E}, "out of range"),
    ],
)
def test_bad_parameters_are_rejected(name, params, message):
    with pytest.raises(MethodError, match=message):
        get_method(name).resolve_parameters(params, num_experts=E, top_k=K)


def test_unknown_method():
    with pytest.raises(MethodError, match="unknown merge_method"):
        get_method("slerp_experts")


def test_registration_is_idempotent_and_visible_to_mergekit():
    register_methods()
    register_methods()
    for name, method in METHODS.items():
        assert mergekit_methods.get(name) is method


def test_kernel_is_a_mergekit_method_with_equal_shapes():
    from mergekit.merge_methods.base import TensorGroup

    tensors = [torch.randn(5, 7) for _ in range(3)]
    (merged,) = METHODS["router_weighted"](
        [TensorGroup.from_tensors(tensors, ids=(0, 1, 2))], parameters={"expert_weight": {0: 0.2, 1: 0.0, 2: 0.8}}
    )
    torch.testing.assert_close(merged, 0.2 * tensors[0] + 0.8 * tensors[2])


def test_kernel_accumulates_bf16_experts_in_float32():
    from mergekit.merge_methods.base import TensorGroup

    tensors = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(3)]
    weights = {0: 0.3, 1: 0.45, 2: 0.25}
    (merged,) = METHODS["router_weighted"](
        [TensorGroup.from_tensors(tensors, ids=(0, 1, 2))], parameters={"expert_weight": weights}
    )
    expected = torch.zeros(64, 32)
    for e, tensor in enumerate(tensors):
        expected += weights[e] * tensor.float()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
