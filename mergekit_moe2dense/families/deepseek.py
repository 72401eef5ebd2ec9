# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""DeepSeek-V2 / V3 (transformers' native classes) -> the same architecture, every layer dense.

The dense target sets `first_k_dense_replace = num_hidden_layers`, so every
decoder layer builds `DeepseekV{2,3}MLP` (`mlp.gate_proj/up_proj/down_proj`,
width `intermediate_size`); its MoE fields stay, inert. The layers that were
dense already pass through, zero-padded to the common width where narrower. The
shared experts (one MLP of width n_shared_experts * moe_intermediate_size) are
concatenated with the merged routed experts, unscaled (the MoE adds them ungated).

Routing: the router's own top-k output is what is recorded, so its score
function (softmax for V2, sigmoid for V3), V3's correction bias, group-limited
top-k and `routed_scaling_factor` are all respected. The routed mixture weighs
sum_k g_k per token, which includes routed_scaling_factor: with V3's
`norm_topk_prob: true` that is exactly routed_scaling_factor; otherwise (V2
never renormalises: DeepseekV2TopkRouter ignores norm_topk_prob) its calibrated mean.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DEEPSEEK_SPARSE_LAYERS, DENSE_MLP, MLP_EXPERTS, MTP_LAYERS, shared_mlp
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, Refusal

DEEPSEEK_KEYS = ConfigKeys(experts="n_routed_experts", expert_width="moe_intermediate_size")
DEEPSEEK_SHARED = shared_mlp("shared_experts", width="moe_intermediate_size", count="n_shared_experts")


def all_dense(config) -> dict:
    return {"first_k_dense_replace": config.num_hidden_layers}


def _refusals(name: str):
    return (Refusal("mlp_bias", True, f"{name} with mlp_bias: true (expert biases) is not supported"),)


DEEPSEEK_V2 = MoEFamily(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    keys=DEEPSEEK_KEYS,
    layouts=MLP_EXPERTS,
    renormalize=False,
    sparse_layers=DEEPSEEK_SPARSE_LAYERS,
    shared=DEEPSEEK_SHARED,
    refusals=_refusals("deepseek_v2"),
    dense=DenseTarget(transformers.DeepseekV2Config, "DeepseekV2ForCausalLM", DENSE_MLP, overrides=all_dense),
    moe_architecture="DeepseekV2ForCausalLM",
    routing_groups=("n_group", "topk_group"),
)

# The sparse block of DeepSeek-V3 and of the families that route as it does (GLM-4.5, dots.llm1):
# sigmoid scores with a correction bias for the choice, group-limited top-k, routed_scaling_factor.
DEEPSEEK_V3_BLOCK = dict(
    keys=DEEPSEEK_KEYS,
    layouts=MLP_EXPERTS,
    renormalize="norm_topk_prob",
    routed_scaling="routed_scaling_factor",
    sparse_layers=DEEPSEEK_SPARSE_LAYERS,
    shared=DEEPSEEK_SHARED,
    extra_tensors={"{block}.gate.e_score_correction_bias": ("E",)},
    routing_groups=("n_group", "topk_group"),
)

DEEPSEEK_V3 = MoEFamily(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    **DEEPSEEK_V3_BLOCK,
    refusals=_refusals("deepseek_v3"),
    unbuilt_layers=MTP_LAYERS,
    dense=DenseTarget(transformers.DeepseekV3Config, "DeepseekV3ForCausalLM", DENSE_MLP, overrides=all_dense),
    moe_architecture="DeepseekV3ForCausalLM",
)
