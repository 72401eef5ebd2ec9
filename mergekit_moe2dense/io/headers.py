# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""safetensors shard headers: where each stored tensor of a checkpoint lies, its dtype and shape.

A safetensors shard starts with its header's length (8 bytes, little-endian) and the JSON header
naming every tensor's dtype, shape and byte range (the format's spec). That is all the checks
(`checks.py`) and the reader (`reader.py`) need to know of a shard before reading tensor data.
Pickle (`.bin`) shards have no header.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from mergekit_moe2dense.io import CheckpointError

__all__ = ["SAFETENSORS_DTYPES", "ShardHeaders", "read_header"]

# safetensors' dtype names (the format's spec)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    # power-of-two FP8 scales (ue8m0), where this torch has them
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}  # fmt: skip

Entry = tuple[str, int, torch.dtype, tuple[int, ...]]  # shard path, absolute data offset, dtype, shape


def read_header(path: str) -> tuple[int, dict[str, Any]]:
    """A safetensors shard's header, and the offset where its data starts."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"shard {path} is truncated or corrupt (unreadable header)") from None
    return 8 + header_len, header


class ShardHeaders:
    """What the shards of `index` store, from their headers (each read once, when first needed).

    `index` is mergekit's index or our `index.SourceIndex`, whose names are the model's: its
    quantized tensors have logical names (the data and scales are `stored` apart), and a
    multimodal checkpoint's text model is `renamed` from the names its shards use."""

    def __init__(self, index: ShardedTensorIndex):
        self.index = index
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    @property
    def quantized(self) -> dict:
        """The index's quantized tensors by logical name (`index.QuantizedTensor`); none in mergekit's."""
        return getattr(self.index, "quantized", {})

    def stored_name(self, name: str) -> str:
        """The name tensor `name` has in its shard."""
        return self.index.stored_name(name) if hasattr(self.index, "stored_name") else name

    def is_stored(self, name: str) -> bool:
        """Whether `name` is a tensor of the model or a quantized tensor's data or scales."""
        return name in self.index.tensor_paths or name in getattr(self.index, "stored", {})

    def entry(self, name: str) -> Entry:
        """Shard path, absolute data offset, dtype and shape of a stored tensor."""
        shard = self.index.tensor_paths.get(name) or getattr(self.index, "stored", {}).get(name)
        if shard is None:
            raise KeyError(name)
        path = os.path.join(self.index.base_path, shard)
        if path not in self._headers:
            self._headers[path] = read_header(path)
        data_start, header = self._headers[path]
        entry = header[self.stored_name(name)]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: unsupported dtype {entry['dtype']}")
        return path, data_start + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as the model holds it (a dequantized tensor's, for quantized ones)."""
        quantized = self.quantized.get(name)
        if quantized is None:
            return self.entry(name)[3]
        shape = self.entry(quantized.data)[3]
        if quantized.kind == "fp8":
            return shape
        *prefix, groups, packed = shape  # mxfp4: [E, out, in/32, 16] holds [E, in, out]
        return (prefix[0], groups * packed * 2, *prefix[1:])

    def logical_dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype as read: the index's `dtype` for quantized tensors, else as stored."""
        return self.index.dtype if name in self.quantized else self.entry(name)[2]
