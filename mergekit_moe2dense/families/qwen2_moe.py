# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen2-MoE -> Qwen2, keeping the shared expert.

`Qwen2MoeSparseMoeBlock` adds sigmoid(shared_expert_gate(x)) * shared_expert(x)
to the routed mixture. The shared expert becomes one more block of the dense
MLP, its down projection scaled by the calibrated mean of that sigmoid gate
(recorded per MoE layer by a hook on `mlp.shared_expert_gate`). Dense layers
(`mlp_only_layers`, `decoder_sparse_step`) pass through, zero-padded if narrower.
"""

from __future__ import annotations

from typing import List, Optional

import transformers

from mergekit_moe2dense.families.gated_experts import GatedExpertsFamily
from mergekit_moe2dense.families.qwen3_moe import dense_values, qwen_sparse_layers

SHARED_KEYS = ("shared_expert_intermediate_size", "qkv_bias")


class Qwen2MoeFamily(GatedExpertsFamily):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_module = "shared_expert"
    extra_tensors = ("shared_expert_gate.weight",)

    def unsupported_reason(self, config) -> Optional[str]:
        if not config.qkv_bias:
            return "Qwen2-MoE with qkv_bias: false has no Qwen2 equivalent (Qwen2 always has q/k/v biases)"
        return None

    def moe_layer_indices(self, config) -> List[int]:
        return qwen_sparse_layers(config)

    def needs_statistics(self, config) -> bool:
        return True  # the shared expert's gate is calibrated

    def shared_gate_module(self, layer: int) -> Optional[str]:
        return f"model.layers.{layer}.mlp.shared_expert_gate"

    def shared_scale(self, config, stats, position: int) -> float:
        return float(stats.mean_shared_gate[position])

    def dense_config(self, config, intermediate_size: int) -> transformers.PretrainedConfig:
        values = dense_values(config, intermediate_size)
        for key in SHARED_KEYS:
            values.pop(key, None)
        # layer_types, sliding_window and max_window_layers are carried as they are.
        dense = transformers.Qwen2Config(**values)
        dense.architectures = ["Qwen2ForCausalLM"]
        return dense
