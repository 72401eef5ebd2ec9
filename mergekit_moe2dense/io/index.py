# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The tensor index of a checkpoint, under the names of the model that converts.

mergekit's `ShardedTensorIndex` maps every stored tensor to its shard. `read_index` turns it into
a `SourceIndex` that lists what the model holds: a quantized checkpoint's tensors (block-wise FP8,
MXFP4) under their logical names, their data and scales kept apart for the reader to dequantize;
a multimodal checkpoint's text model under the names the text-only class gives its tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from mergekit_moe2dense.families import DEQUANTIZED_FORMATS, text_part
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io.checks import check_loadable

__all__ = ["QuantizedTensor", "SourceIndex", "read_index", "read_raw_config"]


@dataclass(frozen=True)
class QuantizedTensor:
    """A logical checkpoint tensor stored quantized, dequantized by `TensorReader` on read.

    `fp8`: block-wise FP8 (DeepSeek-V3, Qwen3 FP8): `data` is the FP8 weight, `scales`
    its `{name}_scale_inv` (one multiplier per `block` of rows x columns, or one per
    tensor when `block` is None). `mxfp4` (GPT-OSS): `data` is `{name}_blocks`
    [E, out, in/32, 16] (two FP4 values a byte), `scales` `{name}_scales` [E, out, in/32]
    (power-of-two exponents + 127); the logical tensor is transformers' in-memory
    [E, in, out].
    """

    kind: str
    data: str
    scales: str
    block: tuple[int, int] | None = None


@dataclass
class SourceIndex(ShardedTensorIndex):
    """mergekit's index of the checkpoint, with quantized tensors under their logical names:
    `tensor_paths` lists what the model holds (a scale tensor is no tensor of the model, so
    it is neither resolved nor copied); `stored` maps the raw data and scale tensors to
    their shards; `dtype` is what quantized tensors dequantize to when the caller names none
    (the config's `dtype`)."""

    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16
    # the text model's name -> the name stored in the shard, for a multimodal checkpoint's text
    # model (families.TextPart): every name above is the text model's
    renamed: dict[str, str] = field(default_factory=dict)
    # config.json's `quantization_config`, as it is there (what a quantized output's config.json keeps)
    quantization_config: dict = field(default_factory=dict)

    def stored_name(self, name: str) -> str:
        """The name tensor `name` has in its shard."""
        return self.renamed.get(name, name)

    def stored_index(self) -> ShardedTensorIndex:
        """mergekit's index of the shards under their stored names (for its pickle loader)."""
        paths = {self.stored_name(name): shard for name, shard in self.tensor_paths.items()}
        return ShardedTensorIndex(
            base_path=self.base_path, is_safetensors=self.is_safetensors, tensor_paths=paths, shards=self.shards
        )


def read_index(path: str) -> SourceIndex:
    """The index of the checkpoint in directory `path` (`SourceIndex`), once the files mergekit
    reads to build it are known to be whole and safe (`checks.check_loadable`)."""
    check_loadable(path)
    try:
        index = ShardedTensorIndex.from_disk(path)
    except RuntimeError:
        raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin") from None
    return _logical_index(index, read_raw_config(path))


def read_raw_config(path: str) -> dict:
    """config.json of the model in `path` as plain JSON; empty when it is missing, unreadable or
    not a JSON object."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _logical_index(index: ShardedTensorIndex, config: dict) -> SourceIndex:
    """`index` with the quantized tensors of an FP8 or MXFP4 checkpoint under their logical
    names (`SourceIndex`). Whether a checkpoint is quantized, and how, comes from config.json's
    `quantization_config`; the families refuse the formats not listed in DEQUANTIZED_FORMATS.
    A multimodal checkpoint whose text model converts (its `model_type` in families.TEXT_PARTS)
    lists only that text model's tensors, under the names the text-only class gives them."""
    paths, renamed = _text_model_paths(index, config)
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method in DEQUANTIZED_FORMATS and not index.is_safetensors:
        raise CheckpointError(
            f"{index.base_path}: a {method} checkpoint in pickle format cannot be dequantized on read (use safetensors)"
        )
    quantized, stored = {}, {}
    if method == "fp8":
        block = quantization.get("weight_block_size")
        quantized, stored = _fp8_tensors(paths, tuple(block) if block else None)
    elif method == "mxfp4":
        quantized, stored = _mxfp4_tensors(paths)
    return SourceIndex(
        base_path=index.base_path,
        is_safetensors=index.is_safetensors,
        tensor_paths=paths,
        shards=index.shards,
        quantized=quantized,
        stored=stored,
        dtype=_dequantized_dtype(config),
        renamed=renamed,
        quantization_config=dict(quantization) if method in DEQUANTIZED_FORMATS else {},
    )


def _text_model_paths(index: ShardedTensorIndex, config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """The tensors' shards by the converted model's names, and those names that differ from the
    stored ones (a multimodal checkpoint's text model); every tensor, as stored, otherwise."""
    part = text_part(config.get("model_type"))
    if part is None:
        return dict(index.tensor_paths), {}
    paths, renamed = {}, {}
    for stored_name, shard in index.tensor_paths.items():
        name = part.text_name(stored_name)
        if name is not None:
            paths[name] = shard
            if name != stored_name:
                renamed[name] = stored_name
    return paths, renamed


def _dequantized_dtype(config: dict) -> torch.dtype:
    """config.json's `dtype` (or `torch_dtype`) where it names a floating-point dtype, else bfloat16."""
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.bfloat16
    return dtype


def _fp8_tensors(
    paths: dict[str, str], block: tuple[int, int] | None
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """FP8 weights and their `_scale_inv` tensors; the scales (and the unused static activation
    scales) move from `paths` to the stored tensors."""
    quantized, stored = {}, {}
    for name in [n for n in paths if n.endswith("_scale_inv")]:
        data = name.removesuffix("_scale_inv")
        if data in paths:
            quantized[data] = QuantizedTensor("fp8", data, name, block)
            stored[data], stored[name] = paths[data], paths.pop(name)
    for name in [n for n in paths if n.endswith(".activation_scale")]:  # static activation scales: unused
        stored[name] = paths.pop(name)
    return quantized, stored


def _mxfp4_tensors(paths: dict[str, str]) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """MXFP4 `_blocks` and `_scales` pairs, moved from `paths` to the stored tensors; `paths`
    lists each pair under its logical name."""
    quantized, stored = {}, {}
    for name in [n for n in paths if n.endswith("_blocks")]:
        data, scales = name, name.removesuffix("_blocks") + "_scales"
        if scales in paths:
            logical = name.removesuffix("_blocks")
            quantized[logical] = QuantizedTensor("mxfp4", data, scales)
            stored[data], stored[scales] = paths.pop(data), paths.pop(scales)
            paths[logical] = stored[data]
    return quantized, stored
