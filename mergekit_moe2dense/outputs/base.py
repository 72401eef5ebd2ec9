# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The interface of an output strategy, and the files every output shares."""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from math import prod
from typing import TYPE_CHECKING, Any

import torch
from mergekit.common import dtype_from_name

from mergekit_moe2dense.families import ExpertSlice

if TYPE_CHECKING:
    from mergekit_moe2dense.job import ConversionJob
    from mergekit_moe2dense.methods import MethodPlan

WEIGHTS_FILE = "expert_weights.json"
# Files of ours that are not the model live in OUT/moe2dense/: loaders take every
# *.safetensors at the top of a model directory for weights (vLLM without an index),
# and do not look into subdirectories. JSON files next to the model are read by none.
SIDECAR_DIR = "moe2dense"
STATS_FILE = f"{SIDECAR_DIR}/router_stats.safetensors"  # relative to OUT
LEGACY_STATS_FILE = "router_stats.safetensors"  # where earlier versions wrote it, at the top of OUT
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


class Output(ABC):
    """One kind of output. `check` runs before any work; `plan` turns the method's
    `MethodPlan` into what is written (it may run the re-fit); `write` writes that into
    the staging directory, which the job publishes."""

    def check(self, job: ConversionJob) -> None:  # noqa: B027 (optional hook: most outputs need no check)
        """Refusals that need only the config and the model (before calibration)."""

    def reported_weights(self, result: MethodPlan) -> torch.Tensor:
        """The expert weights the library's result reports: [L, E], or [k, L, E]."""
        return result.weights

    @abstractmethod
    def plan(self, job: ConversionJob, result: MethodPlan, stats) -> Any:
        """What the graph will write."""

    @abstractmethod
    def write(self, job: ConversionJob, planned: Any, staging: str) -> None:
        """A complete output in `staging`."""

    def estimated_bytes(self, job: ConversionJob) -> int | None:
        """At least what the output will hold (None: unknown): by default one dense model
        whose MLPs are one expert wide (concatenations are wider)."""
        return output_bytes(job, experts_per_layer=1)


def output_bytes(job: ConversionJob, experts_per_layer: int) -> int | None:
    """Bytes of the source's tensors outside the sparse blocks, plus `experts_per_layer`
    experts (and the shared experts) per MoE layer, in the output dtype (None for pickle
    checkpoints, whose sizes only a full read tells)."""
    reader = job.source.reader
    if not reader.index.is_safetensors:
        return None
    consumed = {name for layer in job.layers for name in layer.consumed}
    pieces = [ExpertSlice(name) for name in job.source.rest_of_checkpoint(consumed)]
    for layer in job.layers:
        blocks = [layer.experts[0]] * experts_per_layer + list(layer.shared_experts)
        pieces += [piece for block in blocks for piece in block.values()]
    if job.out_dtype is None:
        return sum(reader.nbytes(piece) for piece in pieces)
    itemsize = dtype_from_name(job.out_dtype).itemsize
    return sum(prod(reader.shape(piece)) * itemsize for piece in pieces)


def write_weights_file(directory: str, job: ConversionJob, payload: dict[str, Any]) -> None:
    """expert_weights.json: the method, its parameters, the MoE layers, and `payload`."""
    content = {
        "method": job.config.merge_method,
        "parameters": job.params.model_dump(mode="json"),
        "layer_indices": [layer.index for layer in job.layers],
        **payload,
    }
    with open(os.path.join(directory, WEIGHTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1)


def write_model_files(directory: str, job: ConversionJob, config) -> None:
    """config.json (in the output dtype) and the tokenizer files, beside the weights."""
    if job.out_dtype:
        config.dtype = job.out_dtype
    if job.source.family.unbuilt_layers is not None and hasattr(config, MTP_LAYERS_KEY):
        # no output carries the multi-token-prediction layers (SourceModel.rest_of_checkpoint):
        # a count above 0 would send vLLM's or transformers' MTP decoding after missing weights
        setattr(config, MTP_LAYERS_KEY, 0)
    config.save_pretrained(directory)
    if job.options.copy_tokenizer:
        for name in TAGALONG_FILES:
            path = os.path.join(job.source.path, name)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(directory, name))
