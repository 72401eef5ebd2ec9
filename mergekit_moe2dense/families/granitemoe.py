# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Granite MoE (`granitemoe`, `granitemoeshared`) -> Granite (`GraniteForCausalLM`).

Granite MoE is Granite with a sparse MLP: the same `embedding_multiplier`,
`residual_multiplier`, `attention_multiplier` (the attention's scale) and
`logits_scaling`, carried into the Granite config as they are. Router
(`GraniteMoeTopKRouter`): softmax over the top-k logits, so the mixture weighs 1.
`granitemoeshared` adds an ungated shared MLP of width `shared_intermediate_size`
(none when 0) whose gate and up projections are one tensor
(`shared_mlp.input_linear` [2S, H], gate rows first).

Both checkpoint layouts are fused, under different names:
- legacy (the hub checkpoints, what `save_pretrained` writes):
  `block_sparse_moe.input_linear.weight` [E, 2I, H] (gate rows first),
  `block_sparse_moe.output_linear.weight` [E, H, I], router
  `block_sparse_moe.router.layer.weight`;
- transformers' names: `block_sparse_moe.experts.gate_up_proj` / `down_proj`,
  router `block_sparse_moe.router.weight`.
A smaller MoE (`prune_experts`, `merge_experts`, `output: moe`) is written in the
hub's fused names (`input_linear` / `output_linear`), the N experts stacked per layer;
the shared MLP is copied.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, FusedLayout, SharedExperts

BLOCK = "model.layers.{layer}.block_sparse_moe"
LAYOUTS = (
    FusedLayout(
        block=BLOCK,
        gate_up="{block}.input_linear.weight",
        down="{block}.output_linear.weight",
        router="{block}.router.layer.weight",
    ),
    FusedLayout(
        block=BLOCK,
        gate_up="{block}.experts.gate_up_proj",
        down="{block}.experts.down_proj",
        router="{block}.router.weight",
    ),
)
KEYS = ConfigKeys(experts="num_local_experts", expert_width="intermediate_size")
DENSE = DenseTarget(transformers.GraniteConfig, "GraniteForCausalLM", DENSE_MLP)
ROUTER_MODULE = "model.layers.{layer}.block_sparse_moe.router"

GRANITEMOE = MoEFamily(
    name="granitemoe",
    model_types=("granitemoe",),
    keys=KEYS,
    layouts=LAYOUTS,
    renormalize=True,
    router_module_path=ROUTER_MODULE,
    memory=LAYOUTS[1],
    dense=DENSE,
    moe_architecture="GraniteMoeForCausalLM",
)

GRANITEMOE_SHARED = MoEFamily(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    keys=KEYS,
    layouts=LAYOUTS,
    renormalize=True,
    router_module_path=ROUTER_MODULE,
    memory=LAYOUTS[1],
    shared=SharedExperts(
        gate="model.layers.{layer}.shared_mlp.input_linear.weight",
        up="model.layers.{layer}.shared_mlp.input_linear.weight",
        down="model.layers.{layer}.shared_mlp.output_linear.weight",
        width="shared_intermediate_size",
        fused_gate_up=True,
        module="model.layers.{layer}.shared_mlp",
    ),
    dense=DENSE,
    moe_architecture="GraniteMoeSharedForCausalLM",
)
