# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Clustering math and the new routers, on synthetic router data with known clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mergekit_moe2dense.calibration import RouterStatistics
from mergekit_moe2dense.clustering import decompose, match_labels
from mergekit_moe2dense.methods import get_method
from mergekit_moe2dense.reassemble import closed_form_router, fitted_router

LAYERS, EXPERTS, TOKENS = 3, 8, 600


def synthetic_logits(k: int, seed: int = 0, spread: float = 0.3):
    """[L, N, E] logits from k clusters: in every layer, cluster j favours its own two experts."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, TOKENS)
    centres = np.zeros((LAYERS, k, EXPERTS))
    for layer in range(LAYERS):
        favoured = rng.permutation(EXPERTS)  # a different expert pair per cluster and layer
        for j in range(k):
            centres[layer, j, favoured[2 * j : 2 * j + 2]] = 4.0
    logits = centres[:, truth] + rng.normal(0, spread, (LAYERS, TOKENS, EXPERTS))
    return logits, truth, centres


@pytest.mark.parametrize("method", ["kmeans", "svd"])
@pytest.mark.parametrize("scope", ["joint", "per_layer"])
def test_recovers_synthetic_clusters_consistently_across_layers(method, scope):
    k = 2 if method == "svd" else 3  # one SVD direction separates two clusters
    logits, truth, _ = synthetic_logits(k)
    found = decompose(logits, k, method=method, scope=scope, seed=0, n_init=3)
    assert found.labels.shape == (LAYERS, TOKENS) and found.centroids.shape == (LAYERS, k, EXPERTS)
    for labels in found.labels:
        assert adjusted_rand_score(truth, labels) > 0.9
    # cluster j is the same tokens in every layer
    assert (found.labels == found.labels[0]).mean() > 0.95


def test_match_labels_undoes_a_permutation():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 4, 200)
    perm = np.array([2, 0, 3, 1])
    shuffled = np.argsort(perm)[reference]  # cluster c of `shuffled` is reference cluster perm[c]
    np.testing.assert_array_equal(match_labels(reference, shuffled, 4), perm)


def test_sorted_by_share_puts_the_largest_cluster_first():
    logits, truth, _ = synthetic_logits(3)
    found = decompose(logits, 3, seed=0).sorted_by_share()
    assert list(found.shares) == sorted(found.shares, reverse=True)
    assert np.isclose(found.shares.sum(), 1.0)


def _stats(logits: np.ndarray) -> RouterStatistics:
    samples = torch.from_numpy(logits).float()
    stats = RouterStatistics(layers=list(range(LAYERS)), num_experts=EXPERTS, top_k=2, samples=samples)
    stats.tokens = samples.shape[1]
    stats.logit_sum = samples.double().sum(1)
    return stats


def _params(**raw):
    return get_method("kmeans_multi_dense").resolve_parameters(raw, num_experts=EXPERTS, top_k=2)


def test_method_recovers_the_per_cluster_weights():
    logits, truth, centres = synthetic_logits(3, spread=0.2)
    method = get_method("kmeans_multi_dense")
    clusters = method.cluster_weights(_stats(logits), _params(num_clusters=3, temperature=2.0))
    labels = clusters.decomposition.labels[0]
    assert adjusted_rand_score(truth, labels) > 0.9
    for j in range(3):
        true_j = np.bincount(truth[labels == j]).argmax()
        expected = torch.softmax(torch.from_numpy(centres[:, true_j]) / 2.0, dim=-1)
        torch.testing.assert_close(clusters.weights[j], expected, atol=0.02, rtol=0)
        assert np.isclose(clusters.shares[j], (truth == true_j).mean())
    assert clusters.weights.shape == (3, LAYERS, EXPERTS)


def test_k1_is_router_weighted_and_top_k_tempered():
    logits, _, _ = synthetic_logits(3)
    stats = _stats(logits)
    method = get_method("kmeans_multi_dense")
    ours = method.cluster_weights(stats, _params(num_clusters=1, temperature=0.7)).weights[0]
    router_weighted = get_method("router_weighted")
    theirs = router_weighted.layer_weights(
        stats,
        router_weighted.resolve_parameters(
            {"aggregate": "mean_logit", "temperature": 0.7}, num_experts=EXPERTS, top_k=2
        ),
        num_layers=LAYERS,
        num_experts=EXPERTS,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    ours = method.cluster_weights(stats, _params(num_clusters=1, features="probs", temperature=0.5)).weights[0]
    top_k_tempered = get_method("top_k_tempered")
    theirs = top_k_tempered.layer_weights(
        stats,
        top_k_tempered.resolve_parameters(
            {"temperature": 0.5, "top_k": 2, "renormalize": True, "aggregate": "mean"}, num_experts=EXPERTS, top_k=2
        ),
        num_layers=LAYERS,
        num_experts=EXPERTS,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def _routed_inputs(k: int, hidden: int = 16, seed: int = 0):
    """Router inputs from k well-separated clusters and an old router that sees them."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, TOKENS)
    means = rng.normal(0, 1, (k, hidden)) * 3
    inputs = means[truth] + rng.normal(0, 0.5, (TOKENS, hidden))
    old_router = rng.normal(0, 1, (EXPERTS, hidden))
    return torch.from_numpy(inputs), truth, torch.from_numpy(old_router)


@pytest.mark.parametrize("router", ["closed_form", "fitted"])
def test_new_router_sends_each_token_to_its_cluster(router):
    k = 3
    inputs, truth, old_router = _routed_inputs(k)
    logits = (inputs @ old_router.T).numpy()[None]  # one layer
    found = decompose(logits, k, seed=0, n_init=3)
    labels = found.labels[0]
    assert adjusted_rand_score(truth, labels) > 0.9
    if router == "fitted":
        new = fitted_router(inputs, labels, k)
    else:
        new = closed_form_router(old_router, torch.softmax(torch.from_numpy(found.centroids[0]), dim=-1))
    assert new.shape == (k, inputs.shape[1])
    routed = (inputs @ new.T).argmax(-1).numpy()
    assert (routed == labels).mean() > 0.95


def test_fitted_router_two_clusters_and_absent_cluster():
    inputs, truth, _ = _routed_inputs(2)
    new = fitted_router(inputs, truth, 3)  # cluster 2 has no token
    assert torch.equal(new[2], torch.zeros(inputs.shape[1], dtype=new.dtype))
    assert ((inputs @ new[:2].T).argmax(-1).numpy() == truth).mean() > 0.95
