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
plain `layer_weights` are cluster 0's. See `multi.py` for the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field
from typing_extensions import Annotated

from mergekit_moe2dense.clustering import Decomposition, decompose
from mergekit_moe2dense.methods.base import ExpertMergeMethod, MethodError, check_top_k, normalize_rows, parameter
from mergekit_moe2dense.methods.router_weighted import Temperature
from mergekit_moe2dense.methods.top_k_tempered import tempered_top_k

PositiveInt = Annotated[int, Field(ge=1)]


@dataclass
class ClusterWeights:
    weights: torch.Tensor  # [k, L, E] float64, rows summing to 1
    decomposition: Decomposition  # labels [L, N], centroids [L, k, E] in feature space

    @property
    def shares(self) -> list:
        return [float(s) for s in self.decomposition.shares]


class KMeansMultiDense(ExpertMergeMethod):
    name = "kmeans_multi_dense"
    pretty_name = "Clustered multi-dense expert merge"
    reference_url = "https://github.com/arcee-ai/mergekit/issues/267"
    multi_output = True
    parameters = (
        parameter("num_clusters", PositiveInt, 2, "k: number of dense models (or experts of the rebuilt MoE)"),
        parameter("decomposition", Literal["kmeans", "svd"], "kmeans", "k-means centroids or SVD poles"),
        parameter("clustering", Literal["joint", "per_layer"], "joint", "cluster all layers at once, or each and match"),
        parameter("features", Literal["logits", "probs"], "logits", "router vectors clustered per token"),
        parameter("temperature", Temperature, 1.0, "softmax temperature over experts"),
        parameter("top_k", Optional[PositiveInt], None, "probs: experts kept per token (default: the model's)"),
        parameter("renormalize", bool, True, "probs: renormalise the kept k probabilities per token"),
        parameter("n_init", PositiveInt, 4, "k-means restarts"),
        parameter("seed", int, 0, "k-means seed"),
        parameter("output", Literal["dense", "moe"], "dense", "k dense models in cluster_j/, or one k-expert MoE"),
        parameter("moe_top_k", Optional[PositiveInt], None, "moe: experts per token (default: min(2, k))"),
        parameter("router", Literal["closed_form", "fitted"], "closed_form", "moe: how the new router is set"),
    )

    def check_parameters(self, params, *, num_experts, top_k):
        check_top_k(params, num_experts=num_experts, top_k=top_k)
        k = params["num_clusters"]
        if params["moe_top_k"] is None:
            params["moe_top_k"] = min(2, k)
        if params["moe_top_k"] > k:
            raise MethodError(f"moe_top_k={params['moe_top_k']} is out of range: the rebuilt MoE has {k} experts")
        if params["decomposition"] == "svd" and (k + 1) // 2 > num_experts and params["clustering"] == "per_layer":
            raise MethodError(f"svd with {k} clusters needs {(k + 1) // 2} directions; a layer has {num_experts}")

    def needs_router_inputs(self, params) -> bool:
        return params["output"] == "moe" and params["router"] == "fitted"

    def cluster_weights(self, stats, params) -> ClusterWeights:
        """Decompose the sampled tokens and turn each group's representative into expert weights."""
        k = params["num_clusters"]
        if stats.samples.shape[1] < k:
            raise MethodError(
                f"{self.name}: {k} clusters need at least {k} sampled tokens, the statistics have "
                f"{stats.samples.shape[1]} (raise calibration.max_token_samples)"
            )
        logits = stats.samples.double()
        if params["features"] == "probs":
            vectors = tempered_top_k(logits, params["temperature"], params["top_k"], params["renormalize"])
        else:
            vectors = logits
        found = decompose(
            vectors.numpy(),
            k,
            method=params["decomposition"],
            scope=params["clustering"],
            seed=params["seed"],
            n_init=params["n_init"],
        ).sorted_by_share()
        centroids = torch.from_numpy(found.centroids).transpose(0, 1)  # [k, L, E]
        if params["features"] == "probs":
            weights = torch.stack([normalize_rows(c) for c in centroids])
        else:
            weights = torch.softmax(centroids / params["temperature"], dim=-1)
        return ClusterWeights(weights, found)

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        return self.cluster_weights(stats, params).weights[0]

