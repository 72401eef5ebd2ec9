# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""DeepSeek-V2 / V3 (transformers' native classes) -> the same architecture, every layer dense.

The dense target sets `first_k_dense_replace = num_hidden_layers`, so every
decoder layer builds `DeepseekV{2,3}MLP` (`mlp.gate_proj/up_proj/down_proj`,
width `intermediate_size`). The layers that were dense already pass through,
zero-padded to the common width where narrower. The shared experts (one MLP of
width n_shared_experts * moe_intermediate_size) are concatenated with the merged
routed experts, unscaled (the MoE adds them ungated).

Routing: the router's own top-k output is what is recorded, so its score
function (softmax for V2, sigmoid for V3), V3's correction bias, group-limited
top-k and `routed_scaling_factor` are all respected. The routed mixture weighs
sum_k g_k per token, which includes routed_scaling_factor: with V3's
`norm_topk_prob: true` that is exactly routed_scaling_factor; otherwise (V2
never renormalises) its calibrated mean.
"""

from __future__ import annotations

from typing import List, Optional

import transformers

from mergekit_moe2dense.families.gated_experts import GatedExpertsFamily, sparse_layers


class DeepseekFamily(GatedExpertsFamily):
    shared_module = "shared_experts"
    config_class: type
    architecture: str

    def unsupported_reason(self, config) -> Optional[str]:
        if getattr(config, "mlp_bias", False):
            return f"{self.name} with mlp_bias: true (expert biases) is not supported"
        return None

    def moe_layer_indices(self, config) -> List[int]:
        if not config.n_routed_experts:
            return []
        return sparse_layers(config, first_dense=config.first_k_dense_replace or 0)

    def num_experts(self, config) -> int:
        return config.n_routed_experts

    def has_shared(self, config) -> bool:
        return bool(config.n_shared_experts)

    def routed_scale(self, config, stats, position: int) -> float:
        if self.renormalizes(config):
            return float(config.routed_scaling_factor)
        return super().routed_scale(config, stats, position)

    def dense_config(self, config, intermediate_size: int) -> transformers.PretrainedConfig:
        values = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            values.pop(key, None)
        values.update(first_k_dense_replace=config.num_hidden_layers, intermediate_size=intermediate_size)
        dense = self.config_class(**values)
        dense.architectures = [self.architecture]
        return dense


class DeepseekV2Family(DeepseekFamily):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    config_class = transformers.DeepseekV2Config
    architecture = "DeepseekV2ForCausalLM"

    def renormalizes(self, config) -> bool:
        return False  # DeepseekV2TopkRouter ignores norm_topk_prob


class DeepseekV3Family(DeepseekFamily):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    extra_tensors = ("gate.e_score_correction_bias",)
    config_class = transformers.DeepseekV3Config
    architecture = "DeepseekV3ForCausalLM"
