# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`kmeans_multi_dense`: k complementary dense models, or one k-expert MoE rebuilt from them.

From the mergekit discussion on merging Mixtral into dense models
(arcee-ai/mergekit#267): one dense model must compromise between what the
experts learnt; k models, each merged with the expert weights of one group of
tokens, can each keep a coherent part. Per calibration token (the recorded
subsample) the router vectors of every layer are

    features: logits   v_t = router logits
    features: probs    v_t = tempered_top_k(logits, T, top_k, renormalize)  (as `top_k_tempered`)

and are split into k groups (`clustering.decompose`: k-means or SVD poles,
`joint` over the concatenation of all layers or `per_layer` and matched).
Representative c_j of group j in layer l gives that layer's expert weights

    logits: w_jl = softmax(c_jl / T)       probs: w_jl = c_jl / sum(c_jl)

so with k = 1 (c = the mean over tokens) the method is `router_weighted`
(`mean_logit`, temperature T) or `top_k_tempered` (`mean`) on the same tokens.
Clusters are numbered by the share of tokens they cover, largest first; the
plan's `weights` and `layers` are cluster 0's, its `clusters` all k: a
`ClusterPlan` (k dense models) or, with `output: moe`, a `MoEPlan` (plan.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergekit_moe2dense.clustering import decompose
from mergekit_moe2dense.methods.base import (
    ExpertMethod,
    MethodError,
    MethodParameters,
    PositiveInt,
    Temperature,
    model_top_k,
    normalize_rows,
)
from mergekit_moe2dense.methods.top_k_tempered import tempered_top_k
from mergekit_moe2dense.plan import ClusterPlan, ClusterWeights, MoEPlan, single_block_plans


class KMeansMultiDense(ExpertMethod):
    name = "kmeans_multi_dense"
    pretty_name = "Clustered multi-dense expert merge"
    reference_url = "https://github.com/arcee-ai/mergekit/issues/267"

    class Parameters(MethodParameters):
        num_clusters: PositiveInt = Field(2, description="k: number of dense models (or experts of the rebuilt MoE)")
        decomposition: Literal["kmeans", "svd"] = Field("kmeans", description="k-means centroids or SVD poles")
        clustering: Literal["joint", "per_layer"] = Field(
            "joint", description="cluster all layers at once, or each and match"
        )
        features: Literal["logits", "probs"] = Field("logits", description="router vectors clustered per token")
        temperature: Temperature = Field(1.0, description="softmax temperature over experts")
        top_k: PositiveInt | None = Field(None, description="probs: experts kept per token (default: the model's)")
        renormalize: bool = Field(True, description="probs: renormalise the kept k probabilities per token")
        n_init: PositiveInt = Field(4, description="k-means restarts")
        seed: int = Field(0, description="k-means seed")
        output: Literal["dense", "moe"] = Field(
            "dense", description="k dense models in cluster_j/, or one k-expert MoE"
        )
        moe_top_k: PositiveInt | None = Field(None, description="moe: experts per token (default: min(2, k))")
        router: Literal["closed_form", "fitted"] = Field("closed_form", description="moe: how the new router is set")

    def complete(self, params, *, num_experts, top_k):
        params = model_top_k(params, "top_k", num_experts=num_experts, top_k=top_k)
        k = params.num_clusters
        if params.moe_top_k is None:
            params = params.model_copy(update={"moe_top_k": min(2, k)})
        if params.moe_top_k > k:
            raise MethodError(f"moe_top_k={params.moe_top_k} is out of range: the rebuilt MoE has {k} experts")
        if params.decomposition == "svd" and (k + 1) // 2 > num_experts and params.clustering == "per_layer":
            raise MethodError(f"svd with {k} clusters needs {(k + 1) // 2} directions; a layer has {num_experts}")
        return params

    def plan_type(self, params) -> type[ClusterPlan] | type[MoEPlan]:
        return MoEPlan if params.output == "moe" else ClusterPlan

    def needs_router_inputs(self, params) -> bool:
        return params.output == "moe" and params.router == "fitted"

    def cluster_weights(self, stats, params) -> ClusterWeights:
        """Decompose the sampled tokens and turn each group's representative into expert weights."""
        k = params.num_clusters
        if stats.samples.shape[1] < k:
            raise MethodError(
                f"{self.name}: {k} clusters need at least {k} sampled tokens, the statistics have "
                f"{stats.samples.shape[1]} (raise calibration.max_token_samples)"
            )
        logits = stats.samples.double()
        if params.features == "probs":
            vectors = tempered_top_k(logits, params.temperature, params.top_k, params.renormalize)
        else:
            vectors = logits
        found = decompose(
            vectors.numpy(),
            k,
            method=params.decomposition,
            scope=params.clustering,
            seed=params.seed,
            n_init=params.n_init,
        ).sorted_by_share()
        centroids = torch.from_numpy(found.centroids).transpose(0, 1)  # [k, L, E]
        if params.features == "probs":
            weights = torch.stack([normalize_rows(c) for c in centroids])
        else:
            weights = torch.softmax(centroids / params.temperature, dim=-1)
        return ClusterWeights(weights, found)

    def plan(self, stats, params, layers) -> ClusterPlan | MoEPlan:
        clusters = self.cluster_weights(stats, params)
        first = clusters.weights[0]
        plans = single_block_plans(layers, first)
        if params.output == "moe":
            return MoEPlan(first, plans, clusters, router=params.router, seed=params.seed)
        return ClusterPlan(first, plans, clusters)
