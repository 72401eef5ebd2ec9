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
log-sum-exp of the rest), in `chunk_NNNNN.safetensors`.

`cache.json` records what the cache was made from: the teacher's content fingerprint (so a
teacher replaced at the same path is not taken for the old one), the tokens' hash and the
settings; and each chunk's size and sha256, checked when the chunk is read, so a truncated,
missing or altered chunk is reported rather than trained on. A cache that matches is reused
(no teacher pass); one made for another teacher, other tokens or settings is refused. Every
file is written under a temporary name and renamed, so a killed run leaves no file that looks
whole; an interrupted pass resumes after its last intact chunk.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from mergekit.common import ModelReference
from safetensors.torch import load, save
from tqdm.auto import tqdm

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerStream, LayerVisitor
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.io.fingerprint import content_fingerprint
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.output_dir import format_gb, is_disk_full, nearest_existing
from mergekit_moe2dense.training.losses import TeacherTargets, top_k_targets

__all__ = [
    "TargetSpec",
    "TeacherCacheError",
    "build_teacher_cache",
    "load_teacher_cache",
    "prepare_teacher_cache",
    "tokens_digest",
]

META_FILE = "cache.json"
FORMAT = 2
# Rank 0's teacher pass can take hours; if rank 0 dies, torchrun stops the ranks that wait
RANK_ZERO_WAIT = datetime.timedelta(days=7)


class TeacherCacheError(Moe2DenseError, ValueError):
    """The teacher cache directory holds a cache for another teacher, other tokens or settings,
    is damaged, or cannot be written."""


@dataclass(frozen=True)
class TargetSpec:
    """What the cache holds per token: the teacher's `top_k` largest logits at `temperature`, the
    teacher run in `dtype`. A cache is reused only for the same spec (it is part of the key)."""

    top_k: int
    temperature: float
    dtype: torch.dtype = torch.float32


def tokens_digest(sequences: torch.Tensor) -> str:
    return hashlib.sha256(sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _key(teacher: str, sequences: torch.Tensor, spec: TargetSpec) -> dict:
    """What a reused cache must have been made with (`_check_same` compares every entry)."""
    return {
        "format": FORMAT,
        "teacher_fingerprint": content_fingerprint(teacher),
        "tokens_sha256": tokens_digest(sequences),
        "shape": list(sequences.shape),
        "top_k": spec.top_k,
        "temperature": spec.temperature,
        "dtype": str(spec.dtype).removeprefix("torch."),
    }


def prepare_teacher_cache(
    cache_dir: str, teacher: str, sequences: torch.Tensor, spec: TargetSpec, *, main: bool, **build_options
) -> TeacherTargets:
    """Build the cache on the main process (under torchrun the other ranks wait for it), then
    load it on every rank. When rank 0 fails, every rank reports rank 0's reason: the cache
    the others would find is only incomplete, and running again would not help."""
    failure = None
    if main:
        try:
            build_teacher_cache(cache_dir, teacher, sequences, spec, **build_options)
        except BaseException as error:  # every rank must hear of it, whatever it is
            failure = error
    reason = _rank_zero_failure(failure)
    if failure is not None:
        raise failure
    if reason is not None:
        raise TeacherCacheError(f"rank 0 could not build the teacher cache {cache_dir}: {reason}")
    return load_teacher_cache(cache_dir, teacher, sequences, spec)


def _rank_zero_failure(failure: BaseException | None) -> str | None:
    """Rank 0's failure as text, on every rank; None when it succeeded."""
    reason = None if failure is None else str(failure) or type(failure).__name__
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reason
    # A gloo group of its own: CPU objects whatever the training backend, and a wait longer
    # than the default group's timeout
    group = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
    box = [reason]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]


def build_teacher_cache(
    cache_dir: str,
    teacher: str,
    sequences: torch.Tensor,
    spec: TargetSpec,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    chunk_sequences: int = 256,
    progress: bool = True,
) -> bool:
    """Fill `cache_dir` for `sequences` [N, T]; False when a matching cache was already there."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise TeacherCacheError(f"--teacher-cache {cache_dir} is not a directory; give a directory")
    key = _key(teacher, sequences, spec)
    existing = _read_meta(cache_dir)
    chunks = []
    if existing is not None:
        _check_same(cache_dir, existing, key)
        if existing.get("complete"):
            return False
        chunks = _intact_chunks(cache_dir, existing)  # those of an interrupted pass
    elif os.path.isdir(cache_dir) and os.listdir(cache_dir):
        raise TeacherCacheError(
            f"teacher cache {cache_dir} is not empty and holds no {META_FILE}; give an empty or new directory"
        )
    source = SourceModel.open(ModelReference.parse(teacher))
    # the data of one token: k int32 indices, k float32 logits, one float32 rest
    kept = min(spec.top_k, getattr(source.config, "vocab_size", None) or spec.top_k)
    token_bytes = sequences.shape[1] * (8 * kept + 4)
    done = sum(chunk["sequences"] for chunk in chunks)
    _check_space(cache_dir, (len(sequences) - done) * token_bytes)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise TeacherCacheError(f"cannot create --teacher-cache {cache_dir} ({error.strerror})") from None
    meta = {**key, "teacher": os.path.realpath(teacher), "complete": False, "chunks": chunks}
    _write_meta(cache_dir, meta, (len(sequences) - done) * token_bytes)
    starts = range(done, len(sequences), chunk_sequences)
    for start in tqdm(starts, desc="Teacher cache", unit="chunk", disable=not progress):
        chunk = sequences[start : start + chunk_sequences]
        targets = _teacher_targets(source, chunk, spec, device, batch_size)
        data = save({"indices": targets.indices.int(), "logits": targets.logits, "rest_lse": targets.rest_lse})
        needed = (len(sequences) - start) * token_bytes
        _write(cache_dir, _chunk_name(len(chunks)), data, needed)
        chunks.append({"sequences": len(chunk), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        _write_meta(cache_dir, meta, needed)
    meta["complete"] = True
    _write_meta(cache_dir, meta, 0)
    return True


def _teacher_targets(source, chunk, spec: TargetSpec, device: str, batch_size: int) -> TeacherTargets:
    batches = [
        TokenBatch(chunk[i : i + batch_size], torch.ones_like(chunk[i : i + batch_size]))
        for i in range(0, len(chunk), batch_size)
    ]
    parts = []
    with LayerStream(source, batches, device=device, dtype=spec.dtype) as stream:
        stream.run(LayerVisitor(), desc="Teacher layers", progress=False)
        head = stream.load_head()
        for b in range(len(batches)):
            targets = top_k_targets(head(stream.inputs(b)), spec.top_k, spec.temperature)
            parts.append(TeacherTargets(*(t.cpu() for t in (targets.indices, targets.logits, targets.rest_lse))))
    return TeacherTargets(*(torch.cat(field) for field in zip(*((p.indices, p.logits, p.rest_lse) for p in parts))))


def load_teacher_cache(cache_dir: str, teacher: str, sequences: torch.Tensor, spec: TargetSpec) -> TeacherTargets:
    """The cached targets of `sequences`, checked against the teacher and settings that made
    them, each chunk against its recorded size and sha256."""
    meta = _read_meta(cache_dir)
    if meta is None or not meta.get("complete"):
        raise TeacherCacheError(f"teacher cache {cache_dir} is incomplete; run again to finish it")
    _check_same(cache_dir, meta, _key(teacher, sequences, spec))
    loaded = [load(_chunk_bytes(cache_dir, number, chunk)) for number, chunk in enumerate(_chunks(cache_dir, meta))]
    if not loaded:
        raise _damaged(cache_dir, f"{META_FILE} lists no chunks")
    targets = TeacherTargets(
        torch.cat([c["indices"] for c in loaded]).long(),
        torch.cat([c["logits"] for c in loaded]),
        torch.cat([c["rest_lse"] for c in loaded]),
    )
    if targets.indices.shape[:2] != sequences.shape:
        held = list(targets.indices.shape[:2])
        raise _damaged(cache_dir, f"its chunks hold {held} tokens, {META_FILE} says {list(sequences.shape)}")
    return targets


def _chunk_name(number: int) -> str:
    return f"chunk_{number:05d}.safetensors"


def _chunks(cache_dir: str, meta: dict) -> list[dict]:
    """The chunk records of `meta`, each {"sequences", "bytes", "sha256"}."""
    chunks = meta.get("chunks")
    fields = {"sequences": int, "bytes": int, "sha256": str}
    if not isinstance(chunks, list) or not all(
        isinstance(chunk, dict) and all(isinstance(chunk.get(k), t) for k, t in fields.items()) for chunk in chunks
    ):
        raise _damaged(cache_dir, f"{META_FILE} has no valid list of chunks")
    return chunks


def _chunk_bytes(cache_dir: str, number: int, chunk: dict) -> bytes:
    """Chunk `number`'s file, checked against the size and sha256 recorded when it was written."""
    name = _chunk_name(number)
    try:
        with open(os.path.join(cache_dir, name), "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise _damaged(cache_dir, f"{name} is missing") from None
    except OSError as error:
        raise _damaged(cache_dir, f"{name} cannot be read ({error.strerror})") from None
    if len(data) != chunk["bytes"]:
        raise _damaged(cache_dir, f"{name} has {len(data)} bytes where {chunk['bytes']} were written")
    if hashlib.sha256(data).hexdigest() != chunk["sha256"]:
        raise _damaged(cache_dir, f"{name} differs from what was written (sha256 mismatch)")
    return data


def _intact_chunks(cache_dir: str, meta: dict) -> list[dict]:
    """The records of an interrupted pass up to its first damaged chunk: what needs no recomputing."""
    intact = []
    for number, chunk in enumerate(_chunks(cache_dir, meta)):
        try:
            _chunk_bytes(cache_dir, number, chunk)
        except TeacherCacheError:
            break
        intact.append(chunk)
    return intact


def _damaged(cache_dir: str, what: str) -> TeacherCacheError:
    return TeacherCacheError(
        f"teacher cache {cache_dir} is damaged: {what}; delete the directory (the next run rebuilds it) "
        "or give another --teacher-cache"
    )


def _read_meta(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise _damaged(cache_dir, f"{META_FILE} cannot be read ({error})") from None
    if not isinstance(meta, dict):
        raise _damaged(cache_dir, f"{META_FILE} holds no JSON object")
    return meta


def _write_meta(cache_dir: str, meta: dict, needed: int) -> None:
    _write(cache_dir, META_FILE, json.dumps(meta, indent=2).encode(), needed)


def _write(cache_dir: str, name: str, data: bytes, needed: int) -> None:
    """`data` into `name` through a temporary name, so that a killed run leaves no file that
    looks whole; `open` gives it the user's usual permissions (0666 less the umask). `needed`:
    about how many bytes the rest of the cache takes, for the message when the disk is full."""
    path = os.path.join(cache_dir, name)
    try:
        with open(path + ".partial", "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path + ".partial", path)
        return
    except OSError as error:
        failure = error
    with contextlib.suppress(OSError):
        os.remove(path + ".partial")
    # Raised outside the except clause: OUT's handler reads a disk-full error anywhere in the
    # chain as OUT's device being full
    if is_disk_full(failure):
        raise TeacherCacheError(_full_message(cache_dir, max(needed, len(data))))
    raise TeacherCacheError(f"cannot write {path} ({failure.strerror or failure}); give another --teacher-cache")


def _check_space(cache_dir: str, needed: int) -> None:
    """Refuse before the teacher pass when the cache cannot fit (`needed` a lower bound)."""
    if needed > shutil.disk_usage(nearest_existing(os.path.abspath(cache_dir))).free:
        raise TeacherCacheError(_full_message(cache_dir, needed))


def _full_message(cache_dir: str, needed: int) -> str:
    free = shutil.disk_usage(nearest_existing(os.path.abspath(cache_dir))).free
    return (
        f"not enough space on the device of teacher cache {cache_dir}: the cache needs about {format_gb(needed)} more, "
        f"{format_gb(free)} is free; free space or give another --teacher-cache"
    )


def _check_same(cache_dir: str, existing: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if existing.get(key) == value:
            continue
        if key == "teacher_fingerprint":
            raise TeacherCacheError(
                f"teacher cache {cache_dir} was made from other teacher weights (those of {existing.get('teacher')} "
                f"then, content fingerprint {str(existing.get(key))[:12]}; this run's teacher has {value[:12]}); "
                "give another directory (or empty this one)"
            )
        raise TeacherCacheError(
            f"teacher cache {cache_dir} was made with {key}={existing.get(key)!r}, this run needs {value!r}; "
            "give another directory (or empty this one)"
        )
