# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""MoE family adapters (one table each, `MoEFamily(...)`), and the one plain list of them."""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import PROJECTIONS, MoEFamily, MoELayer, UnsupportedModelError
from mergekit_moe2dense.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from mergekit_moe2dense.families.dots1 import DOTS1
from mergekit_moe2dense.families.ernie4_5_moe import ERNIE4_5_MOE
from mergekit_moe2dense.families.flex_olmo import FLEX_OLMO
from mergekit_moe2dense.families.glm4_moe import GLM4_MOE
from mergekit_moe2dense.families.gpt_oss import GPT_OSS
from mergekit_moe2dense.families.granitemoe import GRANITEMOE, GRANITEMOE_SHARED
from mergekit_moe2dense.families.hunyuan_v1_moe import HUNYUAN_V1_MOE
from mergekit_moe2dense.families.llama4 import LLAMA4_MULTIMODAL, LLAMA4_TEXT
from mergekit_moe2dense.families.minimax_m2 import MINIMAX_M2
from mergekit_moe2dense.families.mixtral import MIXTRAL
from mergekit_moe2dense.families.olmoe import OLMOE
from mergekit_moe2dense.families.qwen2_moe import QWEN2_MOE
from mergekit_moe2dense.families.qwen3_5_moe import QWEN3_5_MOE, QWEN3_5_MOE_MULTIMODAL, QWEN3_5_MOE_TEXT_NAMES
from mergekit_moe2dense.families.qwen3_moe import QWEN3_MOE
from mergekit_moe2dense.families.qwen3_next import QWEN3_NEXT
from mergekit_moe2dense.families.spec import ExpertSlice, TextPart

# quantization_config.quant_method values the checkpoint reader dequantizes (io.reader.TensorReader)
DEQUANTIZED_FORMATS = ("fp8", "mxfp4")

FAMILIES: list[MoEFamily] = [MIXTRAL, QWEN3_MOE, QWEN2_MOE, DEEPSEEK_V2, DEEPSEEK_V3, OLMOE, GPT_OSS, QWEN3_NEXT]
FAMILIES += [GLM4_MOE, DOTS1, MINIMAX_M2, ERNIE4_5_MOE, HUNYUAN_V1_MOE, FLEX_OLMO, GRANITEMOE, GRANITEMOE_SHARED]
FAMILIES += [LLAMA4_TEXT, QWEN3_5_MOE]

# Multimodal checkpoints whose text model converts (as the family of their `text_config`),
# by model_type: where the text model's tensors are stored, and what else is left out (and a
# text-only model type whose checkpoints may use the multimodal names).
TEXT_PARTS: dict[str, TextPart] = {
    part.model_type: part for part in (LLAMA4_MULTIMODAL, QWEN3_5_MOE_MULTIMODAL, QWEN3_5_MOE_TEXT_NAMES)
}

# Sparse model types we know of but cannot convert yet, with the reason.
KNOWN_UNSUPPORTED = {
    "phimoe": (
        "PhiMoE's sparsemixer routing has no exact dense equivalent, "
        "and no single-expert PhiMoE target either (its sparsemixer gives NaN with one expert)"
    ),
    "dbrx": "DBRX stores its experts in its own fused layout and clips qkv in a way no dense target shares; not supported yet",
    "jamba": "Jamba is a hybrid Mamba/attention MoE; not supported yet",
}


def supported_families() -> list[str]:
    return [family.name for family in FAMILIES]


def text_part(model_type: str | None) -> TextPart | None:
    """Where a multimodal checkpoint of `model_type` keeps its text model (None: not one of those)."""
    return TEXT_PARTS.get(model_type)


def text_model_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The config of the model that converts: a multimodal checkpoint's text model's
    (`text_config`, `TEXT_PARTS`), else `config` itself."""
    part = text_part(getattr(config, "model_type", None))
    if part is None or not part.multimodal:
        return config
    text = config.get_text_config()
    if text is config:
        raise UnsupportedModelError(f"model_type {config.model_type!r}: config.json has no text_config")
    return text


def get_family(config: transformers.PretrainedConfig) -> MoEFamily:
    """The adapter for `config`, chosen from config.json alone (never from tensor names); for a
    multimodal checkpoint whose text model converts (`TEXT_PARTS`), that of its `text_config`:
    the family's methods then take the text config (`text_model_config`)."""
    model_type = getattr(config, "model_type", "?")
    supported = ", ".join(supported_families())
    quantization = getattr(config, "quantization_config", None)  # a multimodal checkpoint's: at the top
    if quantization:
        if not isinstance(quantization, dict):
            quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else {}
        method = quantization.get("quant_method", "?")
        if method not in DEQUANTIZED_FORMATS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} has quantized weights (quantization_config: {method}); only block-wise "
                f"FP8 (fp8, weight_scale_inv) and MXFP4 (mxfp4) are dequantized on read: dequantize the checkpoint first"
            )
    config = text_model_config(config)
    model_type = getattr(config, "model_type", "?")
    for family in FAMILIES:
        if family.supports(config):
            reason = family.unsupported_reason(config)
            if reason:
                raise UnsupportedModelError(f"{reason}; supported MoE families: {supported}")
            return family
    if getattr(config, "auto_map", None):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a remote-code model (auto_map in config.json): only "
            f"transformers' native classes are supported; supported MoE families: {supported}"
        )
    if model_type in KNOWN_UNSUPPORTED:
        raise UnsupportedModelError(
            f"{KNOWN_UNSUPPORTED[model_type]} (model_type {model_type!r}); supported MoE families: {supported}"
        )
    text = _text_config(config)
    if text is not config and _looks_sparse(text):
        wrappers = ", ".join(part.model_type for part in TEXT_PARTS.values() if part.multimodal)
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a multimodal checkpoint whose text model ({text.model_type}) is an MoE "
            f"family not supported yet (the text part of {wrappers} converts); supported MoE families: {supported}"
        )
    if not _looks_sparse(config):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a Mixture-of-Experts model "
            f"(no expert count in its config); supported MoE families: {supported}"
        )
    raise UnsupportedModelError(f"MoE family {model_type!r} is not supported yet; supported: {supported}")


def _text_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The text model's config of a composite config (the config itself where it has none)."""
    try:
        return config.get_text_config()
    except (ValueError, AttributeError):  # several text configs (encoder-decoder): none to pick
        return config


def _looks_sparse(config: transformers.PretrainedConfig) -> bool:
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(config, key, None) or 0) > 1 for key in keys)


__all__ = [
    "DEQUANTIZED_FORMATS",
    "FAMILIES",
    "PROJECTIONS",
    "ExpertSlice",
    "MoEFamily",
    "MoELayer",
    "TEXT_PARTS",
    "TextPart",
    "UnsupportedModelError",
    "get_family",
    "supported_families",
    "text_model_config",
    "text_part",
]
