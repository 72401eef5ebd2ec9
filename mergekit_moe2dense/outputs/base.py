# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What every writer shares: its context, and the files every output holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from math import prod
from typing import Any

from mergekit.common import dtype_from_name
from mergekit.options import MergeOptions

from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.families.spec import FusedLayout
from mergekit_moe2dense.graph import TensorIO
from mergekit_moe2dense.io.headers import ShardHeaders
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.methods import ExpertMethod, MethodParameters
from mergekit_moe2dense.plan import MoEPlan, SmallerMoEPlan
from mergekit_moe2dense.statistics import LEGACY_STATS_FILE, SIDECAR_DIR, STATS_FILE  # noqa: F401 (outputs' names)

LOG = logging.getLogger(__name__)

WEIGHTS_FILE = "expert_weights.json"
# The number of multi-token-prediction layers stored after the last decoder layer (DeepSeek-V3, GLM-4.5)
MTP_LAYERS_KEY = "num_nextn_predict_layers"
# Tokenizer and generation files copied from the MoE (mergekit's list).
TAGALONG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class WriteContext:
    """What a writer reads besides its plan: the model, how tensors are read and written,
    the output dtype and mergekit's options, and what the model card and expert_weights.json
    record (the conversion's config and YAML text, the method and its parameters, the
    statistics' source and summary)."""

    source: SourceModel
    layers: tuple[MoELayer, ...]
    io: TensorIO
    options: MergeOptions
    out_dtype: str | None
    config: Moe2DenseConfig
    method: ExpertMethod
    params: MethodParameters
    config_source: str | None = None  # the YAML text, recorded in the model card
    stats_path: str | None = None
    calibration: dict | None = None  # what the statistics were computed on (card.calibration_summary)


def output_quantization(
    choice: str | None, source: SourceModel, plan_type: type, block: tuple[int, int] | None = None
) -> str:
    """What an output is written in (`TensorIO.quantization`), from the config's `output_quantization`
    (None: `source` for an MoE output, `none` for a dense one): `source` keeps the source's format
    (graph/quantized.py), `none` dequantizes, `fp8` writes the output's linear weights (and an MoE
    output's experts) in block-wise FP8 (outputs/fp8.py) whatever the source's format. An
    unquantized source's `source` is `none`.

    `source` is refused for dense outputs (their MLPs are new tensors of a new architecture) and for
    FP8 with static activation scales (a merged expert has none); by default the latter is written
    dequantized. `block` (`output_block_size`) without `fp8` is refused."""
    moe_output = plan_type in (SmallerMoEPlan, MoEPlan)
    if choice == "source" and not moe_output:
        raise ConfigError(
            "output_quantization: source keeps the source's quantization in MoE outputs only (prune_experts, "
            "merge_experts, kmeans_multi_dense with output: moe); a dense model is written dequantized (none) "
            "or in FP8 (fp8)"
        )
    if choice == "fp8" and moe_output and isinstance(source.family.moe_layout(), FusedLayout):
        raise ConfigError(
            f"output_quantization: fp8: {source.family.name} writes its experts fused ([E, ...] tensors), which "
            "transformers does not read back from FP8 (it leaves their scales unused); use none, or source for a "
            "quantized source"
        )
    if block is not None and choice != "fp8":
        raise ConfigError("output_block_size applies to output_quantization: fp8 only")
    if choice == "fp8":
        return "fp8"
    quantization = source.index.quantization_config
    if not quantization or (choice or ("source" if moe_output else "none")) == "none":
        return "none"
    if quantization.get("activation_scheme") == "static":
        if choice == "source":
            raise ConfigError(
                "output_quantization: source: this FP8 checkpoint has static activation scales, which merged or "
                "re-fitted experts would lack; set output_quantization: none"
            )
        LOG.warning("FP8 with static activation scales: the smaller MoE is written dequantized")
        return "none"
    return "source"


def output_bytes(
    source: SourceModel, layers, out_dtype: str | None, experts_per_layer: int, quantization: str = "none"
) -> int | None:
    """Bytes of the source's tensors outside the sparse blocks, plus `experts_per_layer`
    experts (and the shared experts) per MoE layer, in the output dtype, or with `quantization`
    `source` the quantized ones as stored, with `fp8` the decoder layers' matrices at a byte a value
    (their scales left out: at least what is written). None for pickle checkpoints, whose sizes only
    a full read tells."""
    reader = source.reader
    if not reader.index.is_safetensors:
        return None
    consumed = {name for layer in layers for name in layer.consumed}
    pieces = [ExpertSlice(name) for name in source.rest_of_checkpoint(consumed)]
    for layer in layers:
        blocks = [layer.experts[0]] * experts_per_layer + list(layer.shared_experts)
        pieces += [piece for block in blocks for piece in block.values()]
    itemsize = dtype_from_name(out_dtype).itemsize if out_dtype is not None else None
    kept = source.index.quantized if quantization == "source" else {}
    headers = ShardHeaders(source.index)
    total = 0
    for piece in pieces:
        if piece.tensor in kept:
            total += _stored_bytes(reader, headers, kept[piece.tensor], piece)
        elif quantization == "fp8" and ".layers." in piece.tensor and len(reader.shape(piece)) == 2:
            total += prod(reader.shape(piece))
        elif itemsize is None:
            total += reader.nbytes(piece)
        else:
            total += prod(reader.shape(piece)) * itemsize
    return total


def _stored_bytes(reader, headers: ShardHeaders, quantized, piece: ExpertSlice) -> int:
    """A piece of a quantized tensor's share of its stored data and scales."""
    stored = sum(prod(entry[3]) * entry[2].itemsize for entry in map(headers.entry, (quantized.data, quantized.scales)))
    return stored * prod(reader.shape(piece)) // prod(reader.shape(ExpertSlice(piece.tensor)))


def write_weights_file(directory: str, context: WriteContext, payload: dict[str, Any]) -> None:
    """expert_weights.json: the method, its parameters, the MoE layers, and `payload`."""
    content = {
        "method": context.config.merge_method,
        "parameters": context.params.model_dump(mode="json"),
        "layer_indices": [layer.index for layer in context.layers],
        **payload,
    }
    with open(os.path.join(directory, WEIGHTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1)


def write_model_files(directory: str, context: WriteContext, config, quantization_config: dict | None = None) -> None:
    """config.json (in the output dtype, with `quantization_config` where given) and the tokenizer
    files, beside the weights."""
    if context.out_dtype:
        config.dtype = context.out_dtype
    if context.io.quantization == "source":  # the tensors are in the source's format: its config says how
        config.quantization_config = dict(context.source.index.quantization_config)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    if context.source.family.unbuilt_layers is not None and hasattr(config, MTP_LAYERS_KEY):
        # no output carries the multi-token-prediction layers (SourceModel.rest_of_checkpoint):
        # a count above 0 would send vLLM's or transformers' MTP decoding after missing weights
        setattr(config, MTP_LAYERS_KEY, 0)
    config.save_pretrained(directory)
    if context.options.copy_tokenizer:
        for name in TAGALONG_FILES:
            path = os.path.join(context.source.path, name)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(directory, name))
