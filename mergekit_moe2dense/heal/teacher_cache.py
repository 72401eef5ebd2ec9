# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`--teacher-cache DIR`: the teacher's top-k next-token logits for the training tokens,
computed once by streaming the teacher layer by layer, so that the student trains without
the teacher in memory.

The teacher runs on the layer-streaming engine (`calibration/layerwise.py::LayerStream`):
one decoder layer in memory at a time, then the final norm and the LM head
(`LayerStream.load_head`). Sequences are processed in chunks of `chunk_sequences`, one
stream of the checkpoint per chunk, so the carried activations stay bounded. Per token the
cache stores what `losses.top_k_targets` returns (top-k indices, their logits / T, the
log-sum-exp of the rest), in `chunk_NNNNN.safetensors`; `cache.json` records the teacher,
the tokens' hash and the settings. A cache that matches is reused (no teacher pass); one
made for other tokens or settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from mergekit.common import ModelReference
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerVisitor
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.heal.losses import TeacherTargets, top_k_targets

__all__ = ["TeacherCacheError", "build_teacher_cache", "load_teacher_cache", "tokens_digest"]

META_FILE = "cache.json"
FORMAT = 1


class TeacherCacheError(Moe2DenseError, ValueError):
    """The teacher cache directory holds a cache for other tokens, teacher or settings."""


def tokens_digest(sequences: torch.Tensor) -> str:
    return hashlib.sha256(sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _meta(teacher: str, sequences: torch.Tensor, top_k: int, temperature: float, dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT,
        "teacher": os.path.realpath(teacher),
        "tokens_sha256": tokens_digest(sequences),
        "shape": list(sequences.shape),
        "top_k": top_k,
        "temperature": temperature,
        "dtype": str(dtype).removeprefix("torch."),
    }


def build_teacher_cache(
    cache_dir: str,
    teacher: str,
    sequences: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    chunk_sequences: int = 256,
    progress: bool = True,
) -> bool:
    """Fill `cache_dir` for `sequences` [N, T]; False when a matching cache was already there."""
    meta = _meta(teacher, sequences, top_k, temperature, dtype)
    existing = _read_meta(cache_dir)
    if existing is not None:
        _check_same(cache_dir, existing, meta)
        if existing.get("complete"):
            return False
    elif os.path.isdir(cache_dir) and os.listdir(cache_dir):
        raise TeacherCacheError(
            f"teacher cache {cache_dir} is not empty and holds no {META_FILE}; give an empty or new directory"
        )
    os.makedirs(cache_dir, exist_ok=True)
    _write_meta(cache_dir, {**meta, "complete": False})
    source = SourceModel.open(ModelReference.parse(teacher))
    starts = range(0, len(sequences), chunk_sequences)
    for number, start in enumerate(tqdm(starts, desc="Teacher cache", unit="chunk", disable=not progress)):
        path = os.path.join(cache_dir, f"chunk_{number:05d}.safetensors")
        if os.path.exists(path):  # written by an interrupted earlier pass over the same tokens
            continue
        chunk = sequences[start : start + chunk_sequences]
        targets = _teacher_targets(source, chunk, top_k, temperature, device, dtype, batch_size)
        save_file(
            {"indices": targets.indices.to(torch.int32), "logits": targets.logits, "rest_lse": targets.rest_lse},
            path + ".partial",
        )
        os.replace(path + ".partial", path)
    _write_meta(cache_dir, {**meta, "complete": True, "chunk_sequences": chunk_sequences})
    return True


def _teacher_targets(source, chunk, top_k, temperature, device, dtype, batch_size) -> TeacherTargets:
    batches = [
        TokenBatch(chunk[i : i + batch_size], torch.ones_like(chunk[i : i + batch_size]))
        for i in range(0, len(chunk), batch_size)
    ]
    parts = []
    with LayerStream(source, batches, device=device, dtype=dtype) as stream:
        stream.run(LayerVisitor(), desc="Teacher layers", progress=False)
        head = stream.load_head()
        for b in range(len(batches)):
            targets = top_k_targets(head(stream.inputs(b)), top_k, temperature)
            parts.append(TeacherTargets(*(t.cpu() for t in (targets.indices, targets.logits, targets.rest_lse))))
    return TeacherTargets(*(torch.cat(field) for field in zip(*((p.indices, p.logits, p.rest_lse) for p in parts))))


def load_teacher_cache(
    cache_dir: str, teacher: str, sequences: torch.Tensor, *, top_k, temperature, dtype
) -> TeacherTargets:
    """The cached targets of `sequences`, checked against the settings that made them."""
    meta = _read_meta(cache_dir)
    if meta is None or not meta.get("complete"):
        raise TeacherCacheError(f"teacher cache {cache_dir} is incomplete; run again to finish it")
    _check_same(cache_dir, meta, _meta(teacher, sequences, top_k, temperature, dtype))
    chunks = sorted(
        name for name in os.listdir(cache_dir) if name.startswith("chunk_") and name.endswith(".safetensors")
    )
    loaded = [load_file(os.path.join(cache_dir, name)) for name in chunks]
    targets = TeacherTargets(
        torch.cat([c["indices"] for c in loaded]).long(),
        torch.cat([c["logits"] for c in loaded]),
        torch.cat([c["rest_lse"] for c in loaded]),
    )
    if targets.indices.shape[:2] != sequences.shape:
        raise TeacherCacheError(
            f"teacher cache {cache_dir} holds {list(targets.indices.shape[:2])} tokens, expected {list(sequences.shape)}"
        )
    return targets


def _read_meta(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_meta(cache_dir: str, meta: dict) -> None:
    path = os.path.join(cache_dir, META_FILE)
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    os.replace(path + ".partial", path)


def _check_same(cache_dir: str, existing: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if existing.get(key) != value:
            raise TeacherCacheError(
                f"teacher cache {cache_dir} was made with {key}={existing.get(key)!r}, this run needs {value!r}; "
                "give another directory (or empty this one)"
            )
