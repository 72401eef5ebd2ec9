# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen3-MoE -> Qwen3.

Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, are
dense already (`intermediate_size`) and pass through; the dense target has one
`intermediate_size`, so narrower MLPs are zero-padded (exact: a zero gate/up row
and its zero down column add nothing). Top-k weights are renormalised only with
`norm_topk_prob: true` (the config default is false); see `routed_scale`.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, MLP_EXPERTS, QWEN_SPARSE_LAYERS
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget

# Config keys that only make sense for a sparse model (Qwen2-MoE's too).
MOE_CONFIG_KEYS = (
    "decoder_sparse_step",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "num_experts",
    "num_local_experts",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "mlp_only_layers",
)

QWEN_KEYS = ConfigKeys(experts="num_experts", expert_width="moe_intermediate_size")


def _qwen3_values(config) -> dict:
    # Qwen3's defaults differ (head_dim 128); Qwen3-MoE attends with
    # hidden/heads unless head_dim is set, and slides its window in every
    # layer when it has one, where Qwen3 slides only from max_window_layers on.
    sliding = config.sliding_window is not None
    return {
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "layer_types": ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers,
        "max_window_layers": 0 if sliding else config.num_hidden_layers,
    }


QWEN3_MOE = MoEFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    keys=QWEN_KEYS,
    layouts=MLP_EXPERTS,
    sparse_layers=QWEN_SPARSE_LAYERS,
    dense=DenseTarget(
        transformers.Qwen3Config, "Qwen3ForCausalLM", DENSE_MLP, moe_keys=MOE_CONFIG_KEYS, overrides=_qwen3_values
    ),
    moe_architecture="Qwen3MoeForCausalLM",
)
