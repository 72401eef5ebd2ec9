# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The MoE block layout transformers shares between Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 and OLMoE.

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

from typing import ClassVar, Collection, Dict, List, Optional, Tuple

import transformers

from mergekit_moe2dense.families.base import ExpertSlice, MoEFamily, MoELayer, UnsupportedModelError, _missing

_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class GatedExpertsFamily(MoEFamily):
    """Shared code of the families whose sparse block is `mlp.gate` + `mlp.experts` (+ shared experts)."""

    # Module name of the shared expert(s) under `mlp` (one SwiGLU MLP), if any.
    shared_module: ClassVar[Optional[str]] = None
    # Further tensors of the sparse block under `mlp` (router bias, shared gate): not copied.
    extra_tensors: ClassVar[Tuple[str, ...]] = ()

    def num_experts(self, config) -> int:
        return config.num_experts

    def expert_width(self, config) -> int:
        return config.moe_intermediate_size

    def resolve_layer(self, config, layer: int, tensor_names: Collection[str]) -> MoELayer:
        prefix = f"model.layers.{layer}.mlp"
        if f"{prefix}.experts.0.gate_proj.weight" in tensor_names:
            experts = tuple(
                {p: ExpertSlice(f"{prefix}.experts.{e}.{name}.weight") for p, name in _PROJ.items()}
                for e in range(self.num_experts(config))
            )
        elif f"{prefix}.experts.gate_up_proj" in tensor_names:
            size = self.expert_width(config)
            fused = f"{prefix}.experts"
            experts = tuple(
                {
                    "gate": ExpertSlice(f"{fused}.gate_up_proj", e, (0, size)),
                    "up": ExpertSlice(f"{fused}.gate_up_proj", e, (size, 2 * size)),
                    "down": ExpertSlice(f"{fused}.down_proj", e),
                }
                for e in range(self.num_experts(config))
            )
        else:
            raise _missing(layer, f"{self.name} expert tensors", tensor_names)
        router = f"{prefix}.gate.weight"
        shared = ()
        if self.has_shared(config):
            shared = ({p: ExpertSlice(f"{prefix}.{self.shared_module}.{name}.weight") for p, name in _PROJ.items()},)
        extra = [f"{prefix}.{name}" for name in self.extra_tensors]
        for name in [router, *(s.tensor for block in shared for s in block.values()), *extra]:
            if name not in tensor_names:
                raise _missing(layer, name, tensor_names)
        consumed = {s.tensor for block in experts + shared for s in block.values()} | {router, *extra}
        return MoELayer(layer, experts, router, tuple(sorted(consumed)), shared_experts=shared)

    def has_shared(self, config) -> bool:
        return self.shared_module is not None

    def dense_mlp_names(self, layer: int) -> Dict[str, str]:
        return {p: f"model.layers.{layer}.mlp.{name}.weight" for p, name in _PROJ.items()}

    def dense_layer_width(self, config) -> Optional[int]:
        dense = len(self.moe_layer_indices(config)) < config.num_hidden_layers
        return config.intermediate_size if dense else None

    # -- a smaller MoE of the same family (kmeans_multi_dense, output: moe) -----------
    def moe_config(self, config, num_experts: int, top_k: int) -> transformers.PretrainedConfig:
        if self.has_shared(config) or self.extra_tensors:
            # the new experts would need their own shared-expert and router-bias semantics
            raise UnsupportedModelError(
                f"{self.name}: rebuilding a smaller MoE is supported for families without shared experts "
                "or router biases (mixtral, qwen3_moe, olmoe)"
            )
        values = config.to_dict()
        for key in ("model_type", "transformers_version"):
            values.pop(key, None)
        moe = type(config)(**values)
        # set as attributes: each config class's attribute_map names the stored key
        # (Qwen3-MoE stores num_local_experts, OLMoE num_experts)
        moe.num_experts, moe.num_experts_per_tok = num_experts, top_k
        return moe

    # Written in the legacy per-expert layout, as `save_pretrained` does.
    def moe_expert_names(self, layer: int, expert: int) -> Dict[str, str]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return {p: f"{prefix}.{name}.weight" for p, name in _PROJ.items()}

    def moe_router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    # -- the routed mixture's total weight -----------------------------------------
    def renormalizes(self, config) -> bool:
        """Whether the router divides its top-k weights by their sum."""
        return bool(getattr(config, "norm_topk_prob", False))

    def needs_statistics(self, config) -> bool:
        return not self.renormalizes(config)

    def routed_scale(self, config, stats, position: int) -> float:
        """1 with renormalised top-k weights; otherwise E_t[sum_k g_k] as recorded from the
        router's own top-k weights (which include DeepSeek's routed_scaling_factor)."""
        if self.renormalizes(config):
            return 1.0
        return float(stats.mean_gate[position].sum())


def sparse_layers(config, *, step: int = 1, dense: Collection[int] = (), first_dense: int = 0) -> List[int]:
    """Decoder layers with a sparse MLP under the Qwen (`mlp_only_layers`,
    `decoder_sparse_step`) and DeepSeek (`first_k_dense_replace`) rules."""
    return [
        i
        for i in range(config.num_hidden_layers)
        if i not in dense and (i + 1) % step == 0 and i >= first_dense
    ]
