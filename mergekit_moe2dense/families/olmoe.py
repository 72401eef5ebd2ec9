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

from typing import Dict, Tuple

import transformers

from mergekit_moe2dense.families.gated_experts import GatedExpertsFamily


class OlmoeFamily(GatedExpertsFamily):
    name = "olmoe"
    model_types = ("olmoe",)

    def expert_width(self, config) -> int:
        return config.intermediate_size

    def dense_mlp_names(self, layer: int) -> Dict[str, str]:
        prefix = f"model.layers.{layer}.mlp.experts.0"
        return {p: f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}

    def dense_zero_tensors(self, config, layer: int) -> Dict[str, Tuple[int, ...]]:
        return {f"model.layers.{layer}.mlp.gate.weight": (1, config.hidden_size)}

    def dense_config(self, config, intermediate_size: int) -> transformers.PretrainedConfig:
        values = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            values.pop(key, None)
        values.update(
            num_experts=1, num_experts_per_tok=1, norm_topk_prob=False, intermediate_size=intermediate_size
        )
        dense = transformers.OlmoeConfig(**values)
        dense.architectures = ["OlmoeForCausalLM"]
        return dense
