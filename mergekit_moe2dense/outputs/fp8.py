# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Dense outputs in block-wise FP8 (`output_quantization: fp8`): which tensors of the dense model
are written as float8_e4m3fn weights with a `weight_scale_inv` per block (the write graph quantizes
them, graph/quantized.py `quantized_weights`), and the `quantization_config` with which transformers
loads them (its fine-grained FP8: `FP8Linear` on a GPU, dequantized on load without one).

The weights are those of every plain `nn.Linear` in the decoder layers (attention, MLP projections),
found in the dense target built on the meta device; embeddings, norms, lm_head, biases and the zero
routers of a one-expert target stay in the output dtype. transformers swaps every linear or experts
module for an FP8 one unless told not to: `modules_to_not_convert` lists those left unquantized
(lm_head; an experts module).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
import transformers

__all__ = ["DenseFP8", "dense_fp8"]

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass(frozen=True)
class DenseFP8:
    """The dense model's FP8 weights (tensor names), the modules transformers must leave as they
    are, and the block size of the scales."""

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
) -> DenseFP8:
    """What `config`'s model (the dense target) writes in FP8 with `block`: the weight of each plain
    linear module of a decoder layer, but those named in `excluded` (the zero routers)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    weights, not_converted = set(), []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and _DECODER_LAYER.search(name) and name + ".weight" not in excluded:
            weights.add(name + ".weight")
        elif isinstance(module, torch.nn.Linear) or name.endswith(".experts"):
            not_converted.append(name)
    return DenseFP8(frozenset(weights), tuple(not_converted), tuple(block))
