# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What every writer shares: its context, and the files every output holds."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from math import prod
from typing import Any

from mergekit.common import dtype_from_name
from mergekit.options import MergeOptions

from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.graph import TensorIO
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.methods import ExpertMethod, MethodParameters
from mergekit_moe2dense.statistics import LEGACY_STATS_FILE, SIDECAR_DIR, STATS_FILE  # noqa: F401 (outputs' names)

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


def output_bytes(source: SourceModel, layers, out_dtype: str | None, experts_per_layer: int) -> int | None:
    """Bytes of the source's tensors outside the sparse blocks, plus `experts_per_layer`
    experts (and the shared experts) per MoE layer, in the output dtype (None for pickle
    checkpoints, whose sizes only a full read tells)."""
    reader = source.reader
    if not reader.index.is_safetensors:
        return None
    consumed = {name for layer in layers for name in layer.consumed}
    pieces = [ExpertSlice(name) for name in source.rest_of_checkpoint(consumed)]
    for layer in layers:
        blocks = [layer.experts[0]] * experts_per_layer + list(layer.shared_experts)
        pieces += [piece for block in blocks for piece in block.values()]
    if out_dtype is None:
        return sum(reader.nbytes(piece) for piece in pieces)
    itemsize = dtype_from_name(out_dtype).itemsize
    return sum(prod(reader.shape(piece)) * itemsize for piece in pieces)


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


def write_model_files(directory: str, context: WriteContext, config) -> None:
    """config.json (in the output dtype) and the tokenizer files, beside the weights."""
    if context.out_dtype:
        config.dtype = context.out_dtype
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
