# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Decompose per-token router vectors into k groups of tokens (pure math, numpy in and out).

Input: `vectors` [L, N, D], one D-dimensional router vector per layer for the
same N tokens in every layer (`RouterStatistics.samples` or their probabilities).
Output: a `Decomposition`: per layer a cluster id for every token and k
representative vectors ("centroids"), with cluster j meaning the same group of
tokens in every layer, so that the k models built from it are each coherent.

Scopes:
- `joint`: one problem on the concatenation of a token's vectors over all
  layers ([N, L*D]); one cluster id per token for the whole model.
- `per_layer`: L independent problems, then clusters matched across layers by
  token overlap: the L x k x k contingency tables are solved layer after layer
  with the Hungarian algorithm (maximum overlap with the previous layer's
  matched labels; Kuhn 1955, `scipy.optimize.linear_sum_assignment`).

Decompositions:
- `kmeans`: Lloyd's k-means with k-means++ seeding (scikit-learn), `n_init`
  restarts, seeded; centroids are the cluster means.
- `svd`: the principal directions of the centred matrix X - m = U S V^T. Cluster
  2i and 2i+1 are the two poles m +/- (S_i / sqrt(N)) V_i of direction i (one
  standard deviation along it); tokens go to the nearest pole. Signs of V_i are
  fixed so that the projections have positive skew. k = 1 is the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Decomposition",
    "decompose",
    "kmeans",
    "match_labels",
    "svd_poles",
]


@dataclass
class Decomposition:
    labels: np.ndarray  # [L, N] int, cluster of each token per layer (equal rows when joint)
    centroids: np.ndarray  # [L, k, D] float64

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def shares(self) -> np.ndarray:
        """[k] fraction of tokens in each cluster, averaged over layers."""
        counts = np.stack([np.bincount(row, minlength=self.num_clusters) for row in self.labels])
        return counts.mean(0) / self.labels.shape[1]

    def sorted_by_share(self) -> Decomposition:
        """Clusters renumbered so that cluster 0 covers the most tokens (ties: old order)."""
        order = np.argsort(-self.shares, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return Decomposition(rank[self.labels], self.centroids[:, order])


def kmeans(points: np.ndarray, k: int, *, seed: int, n_init: int) -> tuple:
    """(labels [N], centroids [k, D]) of scikit-learn's k-means."""
    # One OpenMP thread: the problems are small (N <= max_token_samples), and on a
    # loaded machine scikit-learn's spinning threads made a 1024 x 8 fit take 12 s, not 0.08 s.
    # imported here: scikit-learn (and pandas under it) costs ~0.1 GB of RSS, which
    # every other method (and layer-streamed calibration's memory budget) would pay
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points)
    return model.labels_.astype(np.int64), model.cluster_centers_.astype(np.float64)


def svd_poles(points: np.ndarray, k: int) -> tuple:
    """(labels [N], poles [k, D]): the poles m +/- sigma_i v_i of the top ceil(k/2) directions."""
    mean = points.mean(0)
    centred = points - mean
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    skew = (u**3).sum(0)
    signs = np.where(skew < 0, -1.0, 1.0)
    poles = [mean]
    if k > 1:
        poles = []
        for j in range(k):
            direction, sign = divmod(j, 2)
            step = s[direction] / np.sqrt(len(points)) * signs[direction] * vt[direction]
            poles.append(mean + step if sign == 0 else mean - step)
    poles = np.stack(poles)
    distances = ((points[:, None, :] - poles[None]) ** 2).sum(-1)
    return distances.argmin(1).astype(np.int64), poles


def match_labels(reference: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """`perm` with perm[c] = the reference cluster that cluster c overlaps most (a bijection)."""
    from scipy.optimize import linear_sum_assignment

    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (labels, reference), 1)
    rows, cols = linear_sum_assignment(-overlap)
    perm = np.empty(k, dtype=np.int64)
    perm[rows] = cols
    return perm


def decompose(
    vectors: np.ndarray,
    k: int,
    *,
    method: str = "kmeans",
    scope: str = "joint",
    seed: int = 0,
    n_init: int = 4,
) -> Decomposition:
    """Split the N tokens into k groups; see the module docstring."""
    vectors = np.asarray(vectors, dtype=np.float64)
    num_layers, num_tokens, dim = vectors.shape
    if num_tokens < k:
        raise ValueError(f"cannot form {k} clusters from {num_tokens} tokens")
    if method == "svd" and (k + 1) // 2 > min(num_tokens, dim * (num_layers if scope == "joint" else 1)):
        raise ValueError(f"svd: {k} clusters need {(k + 1) // 2} directions; the data has fewer")

    def solve(points):
        if method == "kmeans":
            return kmeans(points, k, seed=seed, n_init=n_init)
        if method == "svd":
            return svd_poles(points, k)
        raise ValueError(f"unknown decomposition {method!r}")

    if scope == "joint":
        labels, centres = solve(vectors.transpose(1, 0, 2).reshape(num_tokens, num_layers * dim))
        return Decomposition(
            np.broadcast_to(labels, (num_layers, num_tokens)).copy(),
            centres.reshape(k, num_layers, dim).transpose(1, 0, 2).copy(),
        )
    if scope != "per_layer":
        raise ValueError(f"unknown scope {scope!r}")
    all_labels, all_centres = [], []
    for layer in range(num_layers):
        labels, centres = solve(vectors[layer])
        if all_labels:
            perm = match_labels(all_labels[-1], labels, k)
            labels = perm[labels]
            reordered = np.empty_like(centres)
            reordered[perm] = centres
            centres = reordered
        all_labels.append(labels)
        all_centres.append(centres)
    return Decomposition(np.stack(all_labels), np.stack(all_centres))
