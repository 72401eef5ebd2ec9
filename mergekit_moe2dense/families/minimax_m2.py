# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""MiniMax-M2 (`minimax_m2`) -> MiniMax-M2 with one expert and top-1 routing.

Router (`MiniMaxM2TopKRouter`): sigmoid scores; `e_score_correction_bias` (a
buffer of the sparse block, not of the router) shifts the choice only; the chosen
scores are always renormalised, so the mixture weighs 1 per token. No shared
experts; every layer is sparse.

Checkpoint layouts (transformers maps `minimax_m2` to Mixtral's converter):
- legacy (the hub checkpoints, what `save_pretrained` writes):
  `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`, router
  `block_sparse_moe.gate.weight`, bias `block_sparse_moe.e_score_correction_bias`;
- fused: `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, router
  `mlp.gate.weight`, bias `mlp.e_score_correction_bias`.

No dense class computes its attention: q/k RMSNorm over all heads together (as
OLMo-2, which however normalises after attention and MLP) with partial rotary
(`rotary_dim` / `partial_rotary_factor`). As for OLMoE, the target is the family
itself with `num_local_experts: 1`, `num_experts_per_tok: 1`: one sigmoid score
renormalised is 1, whatever the (all-zero) router and bias, so each layer is
exactly the merged MLP, stored as expert 0 under the legacy names.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import MLP_EXPERTS
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, PerExpertLayout

BIAS = "{block}.e_score_correction_bias"
LEGACY = "model.layers.{layer}.block_sparse_moe"


def _one_expert(config) -> dict:
    return {"num_local_experts": 1, "num_experts_per_tok": 1}


MINIMAX_M2 = MoEFamily(
    name="minimax_m2",
    model_types=("minimax_m2",),
    keys=ConfigKeys(experts="num_local_experts", expert_width="intermediate_size"),
    layouts=(
        PerExpertLayout(
            block=LEGACY,
            gate="{block}.experts.{expert}.w1.weight",
            up="{block}.experts.{expert}.w3.weight",
            down="{block}.experts.{expert}.w2.weight",
            router="{block}.gate.weight",
        ),
        MLP_EXPERTS[1],
    ),
    renormalize=True,
    extra_tensors={BIAS: ("E",)},
    moe_architecture="MiniMaxM2ForCausalLM",
    dense=DenseTarget(
        transformers.MiniMaxM2Config,
        "MiniMaxM2ForCausalLM",
        {p: f"{LEGACY}.experts.0.{w}.weight" for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))},
        overrides=_one_expert,
        zero_tensors={f"{LEGACY}.gate.weight": (1, "H"), f"{LEGACY}.e_score_correction_bias": (1,)},
    ),
)
