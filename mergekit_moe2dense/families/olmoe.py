# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""OLMoE -> OLMoE with one expert and top-1 routing.

No dense architecture in transformers computes OLMoE's layers: OLMo2 puts its
norms after attention and MLP, OLMoE before, with q/k norms over all heads.
An OLMoE with a single expert, top-1, is exactly a dense MLP: softmax over one
logit is 1, whatever the router weight (written as zeros). The merged MLP is
stored as expert 0 in the per-expert names `save_pretrained` writes.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import MLP_EXPERTS
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget


def _one_expert(config) -> dict:
    return {"num_experts": 1, "num_experts_per_tok": 1, "norm_topk_prob": False}


OLMOE = MoEFamily(
    name="olmoe",
    model_types=("olmoe",),
    keys=ConfigKeys(experts="num_experts", expert_width="intermediate_size"),
    layouts=MLP_EXPERTS,
    dense=DenseTarget(
        transformers.OlmoeConfig,
        "OlmoeForCausalLM",
        {p: f"model.layers.{{layer}}.mlp.experts.0.{p}_proj.weight" for p in ("gate", "up", "down")},
        overrides=_one_expert,
        zero_tensors={"model.layers.{layer}.mlp.gate.weight": (1, "H")},
    ),
    moe_architecture="OlmoeForCausalLM",
)
