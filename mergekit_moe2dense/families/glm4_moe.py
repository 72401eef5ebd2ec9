# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""GLM-4.5 / 4.6 (`glm4_moe`) -> the same architecture, every layer dense.

GLM-4.5's sparse block is DeepSeek-V3's (transformers' `Glm4MoeTopkRouter`):
sigmoid scores, `e_score_correction_bias` for the choice only, group-limited
top-k (`n_group`, `topk_group`), `norm_topk_prob` and `routed_scaling_factor`,
plus `n_shared_experts` ungated shared experts; the first `first_k_dense_replace`
layers are dense. The target is handled as DeepSeek's: `first_k_dense_replace =
num_hidden_layers`, so every layer builds `Glm4MoeMLP`; the MoE fields stay, inert.

No dense class computes GLM-4.5's attention: `glm4` (GLM-4-0414) adds norms after
attention and MLP and rotates interleaved pairs, where GLM-4.5 has neither, and
GLM-4.5 has optional per-head q/k norms (`use_qk_norm`) and partial rotary
(`partial_rotary_factor`, default 0.5), both carried by keeping the class.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, MTP_LAYERS
from mergekit_moe2dense.families.deepseek import DEEPSEEK_V3_BLOCK, all_dense
from mergekit_moe2dense.families.spec import DenseTarget

GLM4_MOE = MoEFamily(
    name="glm4_moe",
    model_types=("glm4_moe",),
    **DEEPSEEK_V3_BLOCK,
    unbuilt_layers=MTP_LAYERS,
    dense=DenseTarget(transformers.Glm4MoeConfig, "Glm4MoeForCausalLM", DENSE_MLP, overrides=all_dense),
    moe_architecture="Glm4MoeForCausalLM",
)
