# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`clustering: joint` vs `per_layer` on synthetic router logits with known token groups.

Tokens belong to k groups; in every layer a group raises its own pair of experts'
logits by `signal` (a different pair per layer), plus Gaussian noise (sd 1).
Per scope and signal it reports, averaged over seeds: the adjusted Rand index
of each layer's labels against the truth (ARI), the fraction of tokens whose
cluster id is the same in every layer (coherence, what one coherent model per
cluster needs), and the per-layer k-means inertia per token relative to the
per-layer optimum's (fit, 1.00 = as tight as clustering each layer alone).

    python benchmarks/cluster_scope.py            # prints a markdown table
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import adjusted_rand_score

from mergekit_moe2dense.clustering import decompose


def synthetic(layers, tokens, experts, k, signal, seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, tokens)
    centres = np.zeros((layers, k, experts))
    for layer in range(layers):
        favoured = rng.permutation(experts)
        for j in range(k):
            centres[layer, j, favoured[2 * j : 2 * j + 2]] = signal
    return centres[:, truth] + rng.normal(0, 1, (layers, tokens, experts)), truth


def inertia(vectors, labels, k):
    """Mean squared distance of each layer's tokens to their cluster's mean in that layer."""
    total = 0.0
    for layer, row in zip(vectors, labels):
        for j in range(k):
            members = layer[row == j]
            if len(members):
                total += ((members - members.mean(0)) ** 2).sum()
    return total / labels.size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"L={args.layers} N={args.tokens} E={args.experts} k={args.k}, {args.seeds} seeds, kmeans n_init=4\n")
    print("| signal | scope | ARI per layer | coherence | fit (inertia / per-layer) |")
    print("|---|---|---|---|---|")
    for signal in (0.5, 1.0, 2.0, 4.0):
        rows = {}
        for scope in ("joint", "per_layer"):
            ari, coherent, fit = [], [], []
            for seed in range(args.seeds):
                vectors, truth = synthetic(args.layers, args.tokens, args.experts, args.k, signal, seed)
                found = decompose(vectors, args.k, scope=scope, seed=seed, n_init=4)
                ari.append(np.mean([adjusted_rand_score(truth, row) for row in found.labels]))
                coherent.append((found.labels == found.labels[0]).all(0).mean())
                fit.append(inertia(vectors, found.labels, args.k))
            rows[scope] = (np.mean(ari), np.mean(coherent), np.mean(fit))
        for scope, (ari, coherent, fit) in rows.items():
            print(f"| {signal} | {scope} | {ari:.3f} | {coherent:.3f} | {fit / rows['per_layer'][2]:.3f} |")


if __name__ == "__main__":
    main()
