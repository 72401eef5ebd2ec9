# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reading the source MoE: its config, its tensor index, and checks that it is whole."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List

import transformers
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import MoEFamily, MoELayer, get_family


class CheckpointError(Moe2DenseError, ValueError):
    """The model directory is missing files, or a shard is truncated."""


@dataclass
class SourceModel:
    """The MoE to convert: config, family adapter, and where every tensor lives."""

    reference: ModelReference
    path: str
    config: transformers.PretrainedConfig
    family: MoEFamily
    index: ShardedTensorIndex

    @classmethod
    def open(cls, reference: ModelReference, trust_remote_code: bool = False) -> "SourceModel":
        path = reference.local_path()
        if not os.path.isdir(path):
            raise CheckpointError(f"model not found: {reference} (no such directory {path})")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path} has no config.json")
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, OSError) as error:
            _refuse_remote_code(path)
            raise CheckpointError(f"{path}: cannot read config.json ({error})") from None
        family = get_family(config)
        index = _read_index(path)
        check_shards(index)
        return cls(reference, path, config, family, index)

    @property
    def tensor_names(self) -> List[str]:
        return list(self.index.tensor_paths)

    def moe_layers(self) -> List[MoELayer]:
        names = set(self.index.tensor_paths)
        return [
            self.family.resolve_layer(self.config, layer, names)
            for layer in self.family.moe_layer_indices(self.config)
        ]

    def fingerprint(self, layers: List[MoELayer]) -> Dict[str, Any]:
        """Identifies the model by its routers, so statistics can't be reused on another."""
        digest = hashlib.sha256()
        loader = self.reference.lazy_loader()
        for layer in layers:
            digest.update(loader.get_tensor(layer.router).float().numpy().tobytes())
        return {
            "model_type": self.config.model_type,
            "layers": [layer.index for layer in layers],
            "num_experts": layers[0].num_experts if layers else 0,
            "router_sha256": digest.hexdigest(),
        }


def _refuse_remote_code(path: str) -> None:
    """A config transformers cannot read natively because it names remote code (auto_map)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and raw.get("auto_map"):
        get_family(transformers.PretrainedConfig(**raw))  # raises the family/remote-code error


def _read_index(path: str) -> ShardedTensorIndex:
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single) and not os.path.isfile(single + ".index.json"):
        _check_safetensors_size(single)  # before safetensors itself fails on it
    try:
        return ShardedTensorIndex.from_disk(path)
    except RuntimeError:
        raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin") from None


def check_shards(index: ShardedTensorIndex) -> None:
    """Every shard named by the index exists, and every safetensors shard is complete.

    Checked up front so a broken download fails in seconds, not after calibration.
    """
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing shard {shard.filename} in {index.base_path}")
        if index.is_safetensors:
            _check_safetensors_size(path)


def _check_safetensors_size(path: str) -> None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"shard {path} is truncated or corrupt (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        raise CheckpointError(
            f"shard {path} is truncated: {size} bytes, its header needs {8 + header_len + end}"
        )
