# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Checks that a checkpoint is whole, safe to load and as its config.json describes it.

They run before any work, so that a broken download, a pickle that could run code or a config
that contradicts the weights fails in seconds, not after calibration. Only file sizes and shard
headers are read (`headers.py`), never tensor data; a pickle shard is opened with torch's
restricted unpickler onto the meta device.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from math import prod

import torch
import transformers
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from mergekit_moe2dense.families import MoEFamily
from mergekit_moe2dense.io import CheckpointError, ShapeMismatchError
from mergekit_moe2dense.io.headers import ShardHeaders, read_header

__all__ = [
    "check_loadable",
    "check_pickle_shard",
    "check_quantized",
    "check_safetensors_size",
    "check_shapes",
    "check_shards",
]


def check_loadable(path: str) -> None:
    """What mergekit's index of `path` would trip on, refused first with a clear message: a
    truncated single safetensors file (before safetensors fails on it), pickle shards holding
    more than tensors (before mergekit's loader unpickles them)."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single) and not os.path.isfile(single + ".index.json"):
        check_safetensors_size(single)
    if not os.path.exists(single) and not os.path.exists(single + ".index.json"):
        for shard in _pickle_shards(path):
            check_pickle_shard(shard)


def check_safetensors_size(path: str) -> None:
    """A safetensors shard holds every byte its header names."""
    data_start, header = read_header(path)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) < data_start + end:
        raise CheckpointError(
            f"shard {path} is truncated: {os.path.getsize(path)} bytes, its header needs {data_start + end}"
        )


def check_shards(index: ShardedTensorIndex) -> None:
    """Every shard named by the index exists, and every safetensors shard is complete.

    Checked up front so a broken download fails in seconds, not after calibration.
    """
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing shard {shard.filename} in {index.base_path}")
        if index.is_safetensors:
            check_safetensors_size(path)


def _pickle_shards(path: str) -> list[str]:
    """The `.bin` files of a pickle checkpoint (one file, or those its index names)."""
    single = os.path.join(path, "pytorch_model.bin")
    try:
        with open(single + ".index.json", encoding="utf-8") as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
    except FileNotFoundError:
        return [single] if os.path.isfile(single) else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{single}.index.json is not a valid checkpoint index") from None
    # a missing shard is reported by check_shards
    return [os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))]


def check_pickle_shard(shard: str) -> None:
    """A pickle shard holds only tensors (and plain containers), and is readable.

    Loaded with torch's restricted unpickler (`weights_only`) onto the meta device, so
    nothing is executed and no tensor data is read. mergekit lists a single-file
    checkpoint with a bare `torch.load`, which on torch < 2.6 would run any code in
    the pickle; after this check every loader only meets what the safe one accepted.
    """
    try:
        torch.load(shard, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f"it names {found.group(1)}" if found else _first_sentence(error)
        raise CheckpointError(
            f"{shard}: refused: this pickle-format checkpoint holds more than tensors ({reason}), and "
            f"unpickling it could run code. If you trust it, convert it to safetensors: {_conversion_command(shard)}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:  # torch's zip reader raises RuntimeError
        raise CheckpointError(
            f"{shard}: pickle-format checkpoint is truncated or corrupt ({_first_sentence(error)})"
        ) from None


def _conversion_command(shard: str) -> str:
    """A shell command that writes the safetensors twin of the pickle checkpoint
    holding `shard`; safetensors files are read in preference to `.bin` ones.
    (transformers 5 cannot do it: `from_pretrained` ignores `weights_only=False`.)"""
    directory = os.path.dirname(shard)

    def tensors(file: str) -> str:
        return (
            f"{{k: v.contiguous().clone() for k, v in torch.load({file}, weights_only=False).items() "
            "if isinstance(v, torch.Tensor)}"
        )

    code = "import json, torch; from safetensors.torch import save_file; "
    if os.path.basename(shard) == "pytorch_model.bin":
        target = os.path.join(directory, "model.safetensors")
        code += f"save_file({tensors(repr(shard))}, {target!r}, metadata={{'format': 'pt'}})"
    else:  # sharded: every shard, then the index
        each = tensors("f'{d}/{n}'")
        code += (
            f"d = {directory!r}; m = json.load(open(d + '/pytorch_model.bin.index.json'))['weight_map']; "
            "new = {n: n.replace('pytorch_model', 'model').removesuffix('.bin') + '.safetensors' for n in set(m.values())}; "
            f"[save_file({each}, f'{{d}}/{{s}}', metadata={{'format': 'pt'}}) for n, s in new.items()]; "
            "json.dump({'metadata': {}, 'weight_map': {k: new[n] for k, n in m.items()}}, open(d + '/model.safetensors.index.json', 'w'))"
        )
    return f'python -c "{code}"'


def _first_sentence(error: BaseException) -> str:
    """torch's messages run to several sentences and lines of advice."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return re.split(r"\.\s", text)[0].rstrip(".")


def check_quantized(index: ShardedTensorIndex) -> None:
    """Every quantized tensor's data and scales agree (headers only): FP8 data in an FP8
    dtype with one scale per block (`weight_block_size`, the last block of a dimension
    may be partial); MXFP4 blocks [E, out, in/32, 16] bytes with scales [E, out, in/32]."""
    headers = ShardHeaders(index)
    for name, q in headers.quantized.items():
        _, _, data_dtype, data = headers.entry(q.data)
        _, _, _, scales = headers.entry(q.scales)
        if q.kind == "fp8":
            if data_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise ShapeMismatchError(f"{name} has a {q.scales} but is stored as {data_dtype}, not FP8")
            if q.block is None:
                expected = scales if prod(scales) == 1 else (1,)
            else:
                expected = (*data[:-2], *(-(-size // block) for size, block in zip(data[-2:], q.block)))
            what = f"weight_block_size {list(q.block)}" if q.block else "one scale per tensor"
        else:
            expected = data[:-1]
            what = "one exponent per 32 values"
            if data_dtype != torch.uint8 or len(data) != 4 or data[-1] != 16:
                raise ShapeMismatchError(
                    f"{q.data} has shape {list(data)} ({data_dtype}): MXFP4 experts are uint8 [E, out, in/32, 16]"
                )
        if tuple(scales) != tuple(expected):
            raise ShapeMismatchError(
                f"{q.scales} has shape {list(scales)}, {list(expected)} expected for {name} {list(data)} ({what})"
            )


def check_shapes(config: transformers.PretrainedConfig, family: MoEFamily, index: ShardedTensorIndex) -> None:
    """Every shape the conversion relies on agrees with config.json: per MoE layer the
    stored experts (per-expert names, or the E dim of fused tensors), each expert's
    gate/up [I, H] and down [H, I], the router [E, H], shared experts and router
    extras; the MLPs of layers that are dense already. Read from the shard headers
    only, before any work (pickle `.bin` shards have no headers: not checked).
    """
    if not index.is_safetensors:
        return
    names = set(index.tensor_paths)
    headers = ShardHeaders(index)
    declared = family.num_experts(config)
    context = family.describe_dims(config)
    stored = family.stored_experts(names)
    moe_layers = family.moe_layer_indices(config)
    for layer_index in moe_layers:
        layer = family.resolve_layer(config, layer_index, names)
        experts = stored.get(layer_index)
        if experts is not None:
            extra = sorted(set(experts) - set(range(declared)))
            if extra:
                raise ShapeMismatchError(
                    f"{experts[extra[0]]} is in the checkpoint, but config.json declares {declared} experts "
                    f"({context}); layer {layer_index} stores {len(experts)}"
                )
        expected = family.expected_shapes(config, layer, names)
        for name in expected:
            if name not in names:
                have = f"; layer {layer_index} stores {len(experts)}" if experts is not None else ""
                raise ShapeMismatchError(
                    f"{name} is missing from the checkpoint: config.json declares {declared} experts ({context}){have}"
                )
        for name, shape in expected.items():
            _check_shape(headers, name, shape, context)
    _check_dense_mlps(config, family, headers, set(moe_layers))


def _check_dense_mlps(
    config: transformers.PretrainedConfig, family: MoEFamily, headers: ShardHeaders, moe_layers: set[int]
) -> None:
    """The MLPs of the layers that are dense already agree with the family's dense width."""
    dense_width = family.dense_layer_width(config)
    if dense_width is None:
        return
    names = headers.index.tensor_paths
    hidden = family.dims(config)["H"]
    implied = {"gate": (dense_width, hidden), "up": (dense_width, hidden), "down": (hidden, dense_width)}
    keys = f"{family.keys.dense_width}: {dense_width}, {family.keys.hidden}: {hidden}"
    for layer_index in sorted(set(range(config.num_hidden_layers)) - moe_layers):
        for projection, name in family.dense_mlp_names(layer_index).items():
            if name in names:  # a missing dense MLP is reported by the merge, naming it
                _check_shape(headers, name, implied[projection], keys)


def _check_shape(headers: ShardHeaders, name: str, shape: tuple[int, ...], context: str) -> None:
    found = headers.logical_shape(name)
    if tuple(found) != tuple(shape):
        raise ShapeMismatchError(
            f"{name} has shape {list(found)} in the checkpoint, config.json implies {list(shape)} ({context})"
        )
