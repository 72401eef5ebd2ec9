# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Outputs of a method with k groups of expert weights (`kmeans_multi_dense`).

- `output: dense`: OUT/cluster_0/ ... OUT/cluster_{k-1}/, each a complete dense
  model (cluster 0 covers the most calibration tokens), with the token share of
  its cluster in its expert_weights.json and model card; OUT/clusters.json
  summarises them.
- `output: moe`: OUT is one MoE of the same family with k experts (see
  reassemble.py); expert_weights.json holds every expert's weights
  (`experts` [k][L][E]) and token shares.

Everything is written into the build's staging directory, which is renamed into
place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil


from mergekit_moe2dense import build
from mergekit_moe2dense.card import write_moe_card
from mergekit_moe2dense.methods import MethodError
from mergekit_moe2dense.graph import stash_tensors
from mergekit_moe2dense.plan import single_block_plans, with_family_scales
from mergekit_moe2dense.reassemble import closed_form_router, fitted_router, plan_moe_merge

SUMMARY_FILE = "clusters.json"


def cluster_dir(index: int) -> str:
    return f"cluster_{index}"


def check_output(source, config, params, stats_path) -> None:
    """Fail before calibration if too few tokens will be sampled or the family cannot rebuild an MoE."""
    k = params.num_clusters
    if stats_path is None and config.calibration is not None and config.calibration.max_token_samples < k:
        raise MethodError(
            f"{config.merge_method}: {k} clusters need calibration.max_token_samples >= {k} "
            f"(got {config.calibration.max_token_samples})"
        )
    if params.output == "moe":
        source.family.moe_config(source.config, params.num_clusters, params.moe_top_k)
        source.family.moe_router_name(source.moe_layers()[0].index)


def write_outputs(source, config, params, layers, clusters, stats, staging, options, config_source=None) -> None:
    if params.output == "moe":
        _write_moe(source, config, params, layers, clusters, stats, staging, options)
        if options.write_model_card:
            write_moe_card(staging, config, params, clusters.shares, config_source)
        return
    shares = clusters.shares
    for index, weights in enumerate(clusters.weights):
        target = os.path.join(staging, cluster_dir(index))
        os.makedirs(target)
        extra = {"cluster": index, "num_clusters": len(shares), "token_share": shares[index]}
        plans = with_family_scales(single_block_plans(layers, weights), source.family, source.config, stats)
        build.write_dense_model(source, config, params, layers, weights, plans, target, options, config_source, extra)
    summary = {
        "method": config.merge_method,
        "parameters": params.model_dump(mode="json"),
        "clusters": [{"path": cluster_dir(i), "token_share": share} for i, share in enumerate(shares)],
    }
    with open(os.path.join(staging, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)


def _write_moe(source, config, params, layers, clusters, stats, staging, options) -> None:
    family, k = source.family, params.num_clusters
    routers = _routers(source, params, layers, clusters, stats)
    # removed before the directory is published
    router_model = stash_tensors(
        {family.moe_router_name(layer.index): router.float() for layer, router in zip(layers, routers)}, staging, ".routers-"
    )
    out_dtype = config.out_dtype or config.dtype
    targets = plan_moe_merge(
        model=source.reference,
        routers=router_model,
        family=family,
        tensor_names=source.tensor_names,
        layers=layers,
        weights=clusters.weights,
        method=config.merge_method,
        out_path=staging,
        out_dtype=out_dtype,
        dtype=config.dtype,
        max_shard_size=options.out_shard_size,
        safe_serialization=options.safe_serialization,
    )
    try:
        build.run_graph(targets, options)
    finally:
        shutil.rmtree(router_model.model.path, ignore_errors=True)
    moe_config = family.moe_config(source.config, k, params.moe_top_k)
    if out_dtype:
        moe_config.dtype = out_dtype
    moe_config.save_pretrained(staging)
    build.copy_tokenizer(source, staging, options)
    payload = {
        "method": config.merge_method,
        "parameters": params.model_dump(mode="json"),
        "layer_indices": [layer.index for layer in layers],
        "experts": clusters.weights.tolist(),
        "token_share": clusters.shares,
    }
    with open(os.path.join(staging, build.WEIGHTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)


def _routers(source, params, layers, clusters, stats) -> list:
    """One new router [k, H] per layer (see reassemble.py)."""
    if params.router == "fitted":
        labels = clusters.decomposition.labels
        return [
            fitted_router(stats.router_inputs[position], labels[position], params.num_clusters, seed=params.seed)
            for position in range(len(layers))
        ]
    loader = source.reference.lazy_loader()
    return [
        closed_form_router(loader.get_tensor(layer.router), clusters.weights[:, position])
        for position, layer in enumerate(layers)
    ]
