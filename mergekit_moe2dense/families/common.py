# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The sparse block transformers shares between Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 and OLMoE.

Checkpoint layouts (transformers' `conversion_mapping.py` maps all of these
model types to the `qwen2_moe` converter):
- legacy (what `save_pretrained` writes, and the hub checkpoints):
  `model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`;
- fused (transformers 5 in memory): `model.layers.{l}.mlp.experts.gate_up_proj`
  [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I].
The router is `mlp.gate` (a module whose forward returns (logits, top-k weights,
top-k indices)), and an already-dense layer's MLP is `mlp.gate_proj/up_proj/down_proj`.
"""

from __future__ import annotations

from mergekit_moe2dense.families.spec import FusedLayout, PerExpertLayout, SharedExperts, SparseLayers

BLOCK = "model.layers.{layer}.mlp"

MLP_EXPERTS = (
    PerExpertLayout(
        block=BLOCK,
        gate="{block}.experts.{expert}.gate_proj.weight",
        up="{block}.experts.{expert}.up_proj.weight",
        down="{block}.experts.{expert}.down_proj.weight",
        router="{block}.gate.weight",
    ),
    FusedLayout(
        block=BLOCK,
        gate_up="{block}.experts.gate_up_proj",
        down="{block}.experts.down_proj",
        router="{block}.gate.weight",
    ),
)

# The dense MLP (`mlp.gate_proj/up_proj/down_proj`) of the targets and of already-dense layers.
DENSE_MLP = {p: f"model.layers.{{layer}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def shared_mlp(module: str, **keys) -> SharedExperts:
    """Shared experts stored as one SwiGLU MLP `mlp.{module}.gate_proj/up_proj/down_proj`."""
    return SharedExperts(**{p: f"{{block}}.{module}.{p}_proj.weight" for p in ("gate", "up", "down")}, **keys)


# Qwen2/3-MoE's rule (`Qwen2MoeDecoderLayer.__init__`) and DeepSeek's.
QWEN_SPARSE_LAYERS = SparseLayers(step="decoder_sparse_step", dense_list="mlp_only_layers")
DEEPSEEK_SPARSE_LAYERS = SparseLayers(first_dense="first_k_dense_replace")

# Decoder layers by tensor-name prefix: DeepSeek-V3's and GLM-4.5's released checkpoints store
# `num_nextn_predict_layers` multi-token-prediction layers after the last one, which transformers ignores.
MTP_LAYERS = "model.layers.{layer}."
