# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""ERNIE-4.5-MoE (`ernie4_5_moe`) -> ERNIE-4.5 (`Ernie4_5ForCausalLM`), keeping the shared experts.

Router (`Ernie4_5_MoeTopKRouter`): softmax over all experts; the score-correction
statistics (`moe_statics.e_score_correction_bias`, [1, E]) shift the choice only;
the chosen probabilities are divided by max(their sum, `moe_norm_min`), i.e.
renormalised (the clamp only acts below a sum of 1e-12), so the mixture weighs 1.
`moe_num_shared_experts` ungated shared experts (one MLP of that many times
`moe_intermediate_size`) are kept as one more block. Sparse layers: every
`moe_layer_interval`-th from `moe_layer_start_index` to `moe_layer_end_index`; the
others are dense (`intermediate_size`) and pass through.

Checkpoint layouts: per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj` with
the statistics at `mlp.moe_statics.e_score_correction_bias` (the hub's, and what
`save_pretrained` writes), or fused `mlp.experts.gate_up_proj/down_proj` with
them at `mlp.gate.moe_statics.e_score_correction_bias` (transformers' names).

ERNIE-4.5 computes the same attention (interleaved rotary in float32, optional
biases), norms and MLP; its `head_dim` defaults to 128, so it is given explicitly.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import BLOCK, DENSE_MLP, shared_mlp
from mergekit_moe2dense.families.spec import (
    ConfigKeys,
    DenseTarget,
    FusedLayout,
    PerExpertLayout,
    Refusal,
    SparseLayers,
)

STATICS = "{block}.gate.moe_statics.e_score_correction_bias"

MOE_CONFIG_KEYS = ("moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_intermediate_size")


def _ernie_values(config) -> dict:
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


ERNIE4_5_MOE = MoEFamily(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    keys=ConfigKeys(experts="moe_num_experts", expert_width="moe_intermediate_size", top_k="moe_k"),
    layouts=(
        PerExpertLayout(
            block=BLOCK,
            gate="{block}.experts.{expert}.gate_proj.weight",
            up="{block}.experts.{expert}.up_proj.weight",
            down="{block}.experts.{expert}.down_proj.weight",
            router="{block}.gate.weight",
            extras={STATICS: "{block}.moe_statics.e_score_correction_bias"},
        ),
        FusedLayout(
            block=BLOCK,
            gate_up="{block}.experts.gate_up_proj",
            down="{block}.experts.down_proj",
            router="{block}.gate.weight",
        ),
    ),
    renormalize=True,
    sparse_layers=SparseLayers(
        first_dense="moe_layer_start_index", step="moe_layer_interval", last_sparse="moe_layer_end_index"
    ),
    shared=shared_mlp("shared_experts", width="moe_intermediate_size", count="moe_num_shared_experts"),
    extra_tensors={STATICS: (1, "E")},
    refusals=(
        Refusal(
            "use_bias",
            True,
            "ERNIE-4.5-MoE with use_bias: true is not supported (the biases of its shared experts "
            "would need a dense MLP with biases assembled from them)",
        ),
    ),
    dense=DenseTarget(
        transformers.Ernie4_5Config, "Ernie4_5ForCausalLM", DENSE_MLP, moe_keys=MOE_CONFIG_KEYS, overrides=_ernie_values
    ),
    moe_architecture="Ernie4_5_MoeForCausalLM",
)
