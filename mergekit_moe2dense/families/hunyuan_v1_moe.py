# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""HunYuan MoE (`hunyuan_v1_moe`) -> HunYuan dense (`HunYuanDenseV1ForCausalLM`), keeping the shared MLP.

Every layer is sparse: a softmax router (`mlp.gate.wg`, top `moe_topk`, always
renormalised, so the mixture weighs 1) over `num_experts` experts of width
`intermediate_size`, plus an ungated shared MLP of the same width
(`mlp.shared_mlp`). `hunyuan_v1_dense` is the same model with one MLP: the same
attention (q/k RMSNorm per head, applied after the rotary embedding), norms and
embeddings, so the target is exact. A per-layer list of `moe_topk` (which the
config allows) is refused.

Checkpoint layouts: transformers maps `hunyuan_v1_moe` to the shared converter
(`common.py`): per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj`, or fused.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import BLOCK, DENSE_MLP, shared_mlp
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, FusedLayout, PerExpertLayout, Refusal

ROUTER = "{block}.gate.wg.weight"


PER_LAYER_TOP_K = Refusal(
    "moe_topk",
    lambda value: isinstance(value, (list, tuple)),
    "hunyuan_v1_moe with a per-layer list of moe_topk is not supported (the methods take one top-k per model)",
)


HUNYUAN_V1_MOE = MoEFamily(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    keys=ConfigKeys(experts="num_experts", expert_width="intermediate_size", top_k="moe_topk"),
    layouts=(
        PerExpertLayout(
            block=BLOCK,
            gate="{block}.experts.{expert}.gate_proj.weight",
            up="{block}.experts.{expert}.up_proj.weight",
            down="{block}.experts.{expert}.down_proj.weight",
            router=ROUTER,
        ),
        FusedLayout(
            block=BLOCK, gate_up="{block}.experts.gate_up_proj", down="{block}.experts.down_proj", router=ROUTER
        ),
    ),
    renormalize=True,
    shared=shared_mlp("shared_mlp", width="intermediate_size"),
    refusals=(PER_LAYER_TOP_K,),
    dense=DenseTarget(transformers.HunYuanDenseV1Config, "HunYuanDenseV1ForCausalLM", DENSE_MLP),
    moe_architecture="HunYuanMoEV1ForCausalLM",
)
