# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen3-MoE -> Qwen3.

Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, are
dense already (`intermediate_size`) and pass through; the dense target has one
`intermediate_size`, so narrower MLPs are zero-padded (exact: a zero gate/up row
and its zero down column add nothing). Top-k weights are renormalised only with
`norm_topk_prob: true` (the config default is false); see `routed_scale`.
"""

from __future__ import annotations

from typing import List

import transformers

from mergekit_moe2dense.families.gated_experts import GatedExpertsFamily, sparse_layers

# Config keys that only make sense for a sparse model.
MOE_CONFIG_KEYS = (
    "decoder_sparse_step",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "num_experts",
    "num_local_experts",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "mlp_only_layers",
)


def qwen_sparse_layers(config) -> List[int]:
    """Qwen2/3-MoE's rule (`Qwen2MoeDecoderLayer.__init__`)."""
    if not config.num_experts:
        return []
    return sparse_layers(config, step=config.decoder_sparse_step, dense=config.mlp_only_layers or ())


def dense_values(config, intermediate_size: int) -> dict:
    """The MoE config minus its MoE keys, with the merged width."""
    values = config.to_dict()
    for key in MOE_CONFIG_KEYS + ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    values["intermediate_size"] = intermediate_size
    return values


class Qwen3MoeFamily(GatedExpertsFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def moe_layer_indices(self, config) -> List[int]:
        return qwen_sparse_layers(config)

    def dense_config(self, config, intermediate_size: int) -> transformers.PretrainedConfig:
        values = dense_values(config, intermediate_size)
        # Qwen3's defaults differ (head_dim 128); Qwen3-MoE attends with
        # hidden/heads unless head_dim is set, and slides its window in every
        # layer when it has one, where Qwen3 slides only from max_window_layers on.
        values["head_dim"] = values.get("head_dim") or config.hidden_size // config.num_attention_heads
        sliding = config.sliding_window is not None
        values["layer_types"] = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
        values["max_window_layers"] = 0 if sliding else config.num_hidden_layers
        dense = transformers.Qwen3Config(**values)
        dense.architectures = ["Qwen3ForCausalLM"]
        return dense
