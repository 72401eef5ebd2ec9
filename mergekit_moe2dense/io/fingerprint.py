# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A model directory's content fingerprint: what a reused file (statistics, a teacher cache, a
training checkpoint) checks to know it was made from these very weights.

Reading a 1 TB checkpoint whole to hash it would cost more than the work it guards, so the
fingerprint hashes what identifies the weights cheaply: config.json (less the version stamp
that re-saving changes), and for every tensor its name, dtype, shape and evenly spaced samples
of its bytes (at least 4, one per 16 MB, at most 64 windows of 1 KB). Weights that were
retrained, re-initialised, permuted or replaced by another model's differ in every window;
the hash is independent of how the tensors are split into shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io.headers import read_header

__all__ = ["FingerprintError", "content_fingerprint"]

WINDOW = 1024
BYTES_PER_WINDOW = 16 << 20
MIN_WINDOWS, MAX_WINDOWS = 4, 64
# Re-saving a model stamps these without changing what it computes
_UNSTABLE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class FingerprintError(Moe2DenseError, ValueError):
    """The model directory cannot be fingerprinted (no weights, or a shard is unreadable)."""


def content_fingerprint(model_dir: str) -> str:
    """The sha256 (hex) of `model_dir`'s config and sampled weights (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(_config_bytes(model_dir))
    shards = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    entries = []
    for shard in shards:
        data_start, header = _header(shard)
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                entries.append((name, info["dtype"], info["shape"], shard, data_start + start, end - start))
    pickles = sorted(p for p in glob.glob(os.path.join(model_dir, "*")) if p.endswith(_PICKLE_SUFFIXES))
    if not entries and not pickles:
        raise FingerprintError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    for name, dtype, shape, shard, offset, size in sorted(entries):
        digest.update(json.dumps([name, dtype, shape]).encode())
        digest.update(_samples(shard, offset, size))
    for path in pickles:  # a pickled checkpoint has no tensor index to walk: sample the file
        size = os.path.getsize(path)
        digest.update(json.dumps([os.path.basename(path), size]).encode())
        digest.update(_samples(path, 0, size))
    return digest.hexdigest()


def _config_bytes(model_dir: str) -> bytes:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        return b""
    except (OSError, ValueError) as error:
        raise FingerprintError(f"{path} cannot be read ({error})") from None
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _UNSTABLE_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True).encode()


def _header(path: str) -> tuple[int, dict]:
    try:
        return read_header(path)
    except (OSError, CheckpointError):
        raise FingerprintError(f"shard {path} is truncated or corrupt (unreadable header)") from None


def _samples(path: str, offset: int, size: int) -> bytes:
    """`size // BYTES_PER_WINDOW` windows (within the bounds above) spread evenly over the
    `size` bytes at `offset`, first and last included; the whole range when it is small."""
    windows = min(MAX_WINDOWS, max(MIN_WINDOWS, size // BYTES_PER_WINDOW))
    with open(path, "rb") as handle:
        if size <= windows * WINDOW:
            chunks = [os.pread(handle.fileno(), size, offset)]
        else:
            step = (size - WINDOW) / (windows - 1)
            chunks = [os.pread(handle.fileno(), WINDOW, offset + round(i * step)) for i in range(windows)]
    data = b"".join(chunks)
    expected = min(size, windows * WINDOW)
    if len(data) != expected:
        raise FingerprintError(f"shard {path} is truncated ({len(data)} of {expected} sampled bytes could be read)")
    return data
