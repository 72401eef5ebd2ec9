# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Outputs in block-wise FP8 (`output_quantization: fp8`): which tensors of the output are written
as float8_e4m3fn weights with a `weight_scale_inv` per block (the write graph quantizes them,
graph/quantized.py `quantized_weights`), and the `quantization_config` with which transformers
loads them (its fine-grained FP8: `FP8Linear` and `FP8Experts` on a GPU, dequantized on load
without one).

The weights are those of every plain `nn.Linear` in the decoder layers (attention, MLP projections,
shared experts), found in the output's model built on the meta device, and in an MoE output the
routed experts' projections as written; embeddings, norms, lm_head, routers, biases and the zero
routers of a one-expert dense target stay in the output dtype. transformers swaps every linear or
experts module for an FP8 one unless told not to: `modules_to_not_convert` lists those left
unquantized (lm_head; a dense target's one-expert experts module).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
import transformers

from mergekit_moe2dense.families import PROJECTIONS

__all__ = ["FP8Weights", "dense_fp8", "moe_fp8"]

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass(frozen=True)
class FP8Weights:
    """An output's FP8 weights (tensor names), the modules transformers must leave as they are,
    and the block size of the scales."""

    weights: frozenset[str]
    not_converted: tuple[str, ...]
    block: tuple[int, int]

    @property
    def quantization_config(self) -> dict:
        """config.json's `quantization_config` (transformers' `FineGrainedFP8Config`)."""
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
            "modules_to_not_convert": list(self.not_converted),
        }


def dense_fp8(
    config: transformers.PretrainedConfig, block: tuple[int, int], excluded: Collection[str] = ()
) -> FP8Weights:
    """What `config`'s model (the dense target) writes in FP8 with `block`: the weight of each plain
    linear module of a decoder layer, but those named in `excluded` (the zero routers)."""
    return _fp8_weights(config, block, excluded, experts=None)


def moe_fp8(context, config: transformers.PretrainedConfig, num_experts: int) -> FP8Weights | None:
    """With `output_quantization: fp8`, what an MoE output of `num_experts` experts per MoE layer
    (`config`) writes in FP8: the weight of each plain linear module of a decoder layer but the
    routers and shared-expert gates, and the routed experts' projections (names as written)."""
    if context.io.quantization != "fp8":
        return None
    source, family = context.source, context.source.family
    width, layout = family.expert_width(source.config), family.moe_layout()
    experts, excluded = set(), set()
    for layer in context.layers:
        for slices in family.moe_expert_slices(layer.index, num_experts, width):
            experts.update(piece.tensor for projection, piece in slices.items() if projection in PROJECTIONS)
        excluded.add(family.moe_router_name(layer.index))
        excluded.update(layout.extra(template, layer.index) for template in family.extra_tensors)
    return _fp8_weights(config, context.io.fp8_block, excluded, experts=experts)


def _fp8_weights(config, block, excluded: Collection[str], experts: Collection[str] | None) -> FP8Weights:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    weights, not_converted = set(experts or ()), []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and _DECODER_LAYER.search(name) and name + ".weight" not in excluded:
            weights.add(name + ".weight")
        elif isinstance(module, torch.nn.Linear) or (experts is None and name.endswith(".experts")):
            not_converted.append(name)
    return FP8Weights(frozenset(weights), tuple(not_converted), tuple(block))
