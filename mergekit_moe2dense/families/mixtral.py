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
"""

from __future__ import annotations

from typing import Collection, Dict

import transformers

from mergekit_moe2dense.families.base import ExpertSlice, MoEFamily, MoELayer, _missing

# Config keys that only make sense for a sparse model.
MOE_CONFIG_KEYS = (
    "num_local_experts",
    "num_experts_per_tok",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
)


class MixtralFamily(MoEFamily):
    name = "mixtral"
    model_types = ("mixtral",)

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def resolve_layer(self, config, layer: int, tensor_names: Collection[str]) -> MoELayer:
        num_experts = self.num_experts(config)
        legacy = f"model.layers.{layer}.block_sparse_moe"
        fused = f"model.layers.{layer}.mlp"
        if f"{legacy}.experts.0.w1.weight" in tensor_names:
            experts = tuple(
                {
                    "gate": ExpertSlice(f"{legacy}.experts.{e}.w1.weight"),
                    "up": ExpertSlice(f"{legacy}.experts.{e}.w3.weight"),
                    "down": ExpertSlice(f"{legacy}.experts.{e}.w2.weight"),
                }
                for e in range(num_experts)
            )
            router = f"{legacy}.gate.weight"
        elif f"{fused}.experts.gate_up_proj" in tensor_names:
            size = config.intermediate_size
            experts = tuple(
                {
                    "gate": ExpertSlice(f"{fused}.experts.gate_up_proj", e, (0, size)),
                    "up": ExpertSlice(f"{fused}.experts.gate_up_proj", e, (size, 2 * size)),
                    "down": ExpertSlice(f"{fused}.experts.down_proj", e),
                }
                for e in range(num_experts)
            )
            router = f"{fused}.gate.weight"
        else:
            raise _missing(layer, "Mixtral expert tensors", tensor_names)
        if router not in tensor_names:
            raise _missing(layer, f"the router {router}", tensor_names)
        consumed = {s.tensor for expert in experts for s in expert.values()} | {router}
        return MoELayer(layer, experts, router, tuple(sorted(consumed)))

    def dense_mlp_names(self, layer: int) -> Dict[str, str]:
        prefix = f"model.layers.{layer}.mlp"
        return {p: f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}

    def dense_config(self, config, intermediate_size: int) -> transformers.PretrainedConfig:
        values = config.to_dict()
        for key in MOE_CONFIG_KEYS + ("model_type", "architectures", "transformers_version"):
            values.pop(key, None)
        # Mistral's defaults differ from Mixtral's (head_dim, sliding_window, rope,
        # eps): pass every value explicitly so none of them falls back to a default.
        values["head_dim"] = values.get("head_dim") or (
            config.hidden_size // config.num_attention_heads
        )
        values["intermediate_size"] = intermediate_size
        dense = transformers.MistralConfig(**values)
        dense.architectures = ["MistralForCausalLM"]
        return dense

    def moe_config(self, config, num_experts: int, top_k: int) -> transformers.PretrainedConfig:
        values = config.to_dict()
        for key in ("model_type", "transformers_version"):
            values.pop(key, None)
        values.update(num_local_experts=num_experts, num_experts_per_tok=top_k)
        moe = transformers.MixtralConfig(**values)
        moe.architectures = ["MixtralForCausalLM"]
        return moe

    # The smaller MoE is written in the legacy layout, which every Mixtral loader reads.
    def moe_expert_names(self, layer: int, expert: int) -> Dict[str, str]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {"gate": f"{prefix}.w1.weight", "up": f"{prefix}.w3.weight", "down": f"{prefix}.w2.weight"}

    def moe_router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
