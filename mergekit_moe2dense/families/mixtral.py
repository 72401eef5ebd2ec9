# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Mixtral -> Mistral.

Checkpoint layouts:
- legacy (what `save_pretrained` writes, and every Mixtral on the hub):
  `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` (gate/down/up),
  router `block_sparse_moe.gate.weight`;
- fused (transformers 5 in memory): `model.layers.{l}.mlp.experts.gate_up_proj`
  [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I], router
  `mlp.gate.weight`.
Top-k weights are always renormalised (softmax over the chosen logits).
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, MLP_EXPERTS
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, PerExpertLayout

# Config keys that only make sense for a sparse model.
MOE_CONFIG_KEYS = (
    "num_local_experts",
    "num_experts_per_tok",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
)


def _mistral_values(config) -> dict:
    # Mistral's defaults differ from Mixtral's (head_dim, sliding_window, rope,
    # eps): every known value is passed, and head_dim explicitly.
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


MIXTRAL = MoEFamily(
    name="mixtral",
    model_types=("mixtral",),
    keys=ConfigKeys(experts="num_local_experts", expert_width="intermediate_size"),
    layouts=(
        PerExpertLayout(
            block="model.layers.{layer}.block_sparse_moe",
            gate="{block}.experts.{expert}.w1.weight",
            up="{block}.experts.{expert}.w3.weight",
            down="{block}.experts.{expert}.w2.weight",
            router="{block}.gate.weight",
        ),
        MLP_EXPERTS[1],
    ),
    renormalize=True,
    dense=DenseTarget(
        transformers.MistralConfig, "MistralForCausalLM", DENSE_MLP, moe_keys=MOE_CONFIG_KEYS, overrides=_mistral_values
    ),
    moe_architecture="MixtralForCausalLM",
)
