# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Checkpoint I/O: reading the source MoE and writing the output shards.

- `source.py`   `SourceModel`: the MoE to convert (config, family, tensor index), `local_model_path`
- `index.py`    the tensor index: quantized and multimodal checkpoints under their logical names
- `headers.py`  safetensors shard headers: where each stored tensor lies, its dtype and shape
- `checks.py`   checks that a checkpoint is whole and safe before any work: shards, pickles,
                quantization scales, every shape the conversion relies on
- `reader.py`   `TensorReader`: tensors and expert slices read straight into the caller's memory
- `direct.py`   `O_DIRECT` reads into aligned buffers;  `prefetch.py`  reading ahead into the page cache
- `writer.py`   `ShardWriter`: safetensors shards written tensor by tensor
- `quantize.py` block-wise FP8 and MXFP4 quantizers, the inverses of transformers' dequantization
- `fingerprint.py`  a model directory's content fingerprint

The errors every module here raises are defined in this file, so that importing one (the command
line imports `prefetch` before torch) loads nothing else. Named `io` after mergekit's own
`mergekit.io`; imports are absolute, so it never stands in for the standard library's `io`.
"""

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["CheckpointError", "ShapeMismatchError"]


class CheckpointError(Moe2DenseError, ValueError):
    """The model directory is missing files, or a shard is truncated."""


class ShapeMismatchError(CheckpointError):
    """The tensors' shapes (or expert count) contradict config.json."""
