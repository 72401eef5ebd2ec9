# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The teacher cache of `heal`: keyed on the teacher's content, checked chunk by chunk on
reuse, written atomically with the user's permissions, kept out of OUT, and its failures
(a full disk included) reported in one line that names the cache, on every rank."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from helpers import assert_one_line_error, convert_uniform, make_mixtral, run_cli
from mergekit_moe2dense.training import teacher_cache
from mergekit_moe2dense.training.teacher_cache import (
    TargetSpec,
    TeacherCacheError,
    build_teacher_cache,
    load_teacher_cache,
    prepare_teacher_cache,
)

SEQ = 32
SPEC = TargetSpec(top_k=7, temperature=2.0, dtype=torch.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir, calib_dir):
    """Two tiny Mixtral teachers with different weights, a student, and token sequences."""
    root = tmp_path_factory.mktemp("teacher_cache")
    teacher = make_mixtral(root / "teacher", tokenizer_dir, seed=3)
    other = make_mixtral(root / "other", tokenizer_dir, seed=4)
    student = convert_uniform(teacher, root / "student", calib_dir)
    sequences = torch.randint(4, 300, (5, SEQ), generator=torch.Generator().manual_seed(0))
    return {"teacher": teacher, "other": other, "student": student, "data": calib_dir / "mixed.txt", "seq": sequences}


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """A complete cache of 3 chunks (2 + 2 + 1 sequences) of `models["teacher"]`."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    build(cache, models["teacher"], models["seq"])
    return cache


def build(cache, teacher, sequences, **extra) -> bool:
    return build_teacher_cache(
        str(cache), str(teacher), sequences, SPEC, batch_size=2, chunk_sequences=2, progress=False, **extra
    )


def load(cache, teacher, sequences):
    return load_teacher_cache(str(cache), str(teacher), sequences, SPEC)


def assert_same_targets(a, b):
    assert all(torch.equal(getattr(a, name), getattr(b, name)) for name in ("indices", "logits", "rest_lse"))


# ------------------------------------------------------------------------------- the key


def test_a_teacher_replaced_at_the_same_path_is_refused_and_a_copy_elsewhere_reuses(models, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(models["teacher"], teacher)
    cache = tmp_path / "cache"
    build(cache, teacher, models["seq"])
    expected = load(cache, teacher, models["seq"])

    shutil.rmtree(teacher)  # other weights at the same path
    shutil.copytree(models["other"], teacher)
    with pytest.raises(TeacherCacheError, match="made from other teacher weights"):
        load(cache, teacher, models["seq"])
    with pytest.raises(TeacherCacheError, match="made from other teacher weights"):
        build(cache, teacher, models["seq"])

    moved = tmp_path / "moved"  # the first weights at another path: the cache serves them
    shutil.copytree(models["teacher"], moved)
    assert not build(cache, moved, models["seq"])
    assert_same_targets(load(cache, moved, models["seq"]), expected)


# ------------------------------------------------------------------------------ damage


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _without_chunk_list(path):
    meta = json.loads(path.read_text())
    del meta["chunks"]
    path.write_text(json.dumps(meta))


DAMAGES = {
    "truncated chunk": ("chunk_00001.safetensors", _truncate, r"chunk_00001.safetensors has \d+ bytes where \d+"),
    "empty chunk": ("chunk_00000.safetensors", lambda p: p.write_bytes(b""), "chunk_00000.safetensors has 0 bytes"),
    "missing chunk": ("chunk_00002.safetensors", lambda p: p.unlink(), "chunk_00002.safetensors is missing"),
    "altered chunk": ("chunk_00002.safetensors", _flip_last_byte, "chunk_00002.safetensors differs .*sha256"),
    "unparsable cache.json": ("cache.json", lambda p: p.write_text('{"format": '), "cache.json cannot be read"),
    "empty cache.json": ("cache.json", lambda p: p.write_text(""), "cache.json cannot be read"),
    "cache.json not an object": ("cache.json", lambda p: p.write_text("[]"), "cache.json holds no JSON object"),
    "cache.json without chunks": ("cache.json", _without_chunk_list, "cache.json has no valid list of chunks"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_refused_saying_what_is_damaged_and_what_to_do(models, built, tmp_path, damage):
    name, spoil, what = DAMAGES[damage]
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    spoil(cache / name)
    with pytest.raises(TeacherCacheError, match=f"is damaged: {what}.*; delete the directory .*--teacher-cache"):
        load(cache, models["teacher"], models["seq"])


def test_heal_reports_a_damaged_cache_in_one_line(models, tmp_path):
    cache = tmp_path / "cache"
    assert run_cli(*heal_args(models, tmp_path / "first", cache)).exit_code == 0
    _truncate(cache / "chunk_00000.safetensors")
    result = run_cli(*heal_args(models, tmp_path / "second", cache))
    assert_one_line_error(result, "teacher cache .* is damaged: chunk_00000.safetensors has")
    assert not (tmp_path / "second").exists()


def heal_args(models, out, cache):
    return (
        "heal", models["student"], out, "--teacher", models["teacher"], "--data", models["data"],
        "--seq-len", SEQ, "--max-tokens", 2 * SEQ, "--batch-size", 2, "--teacher-cache", cache, "--quiet",
    )  # fmt: skip


# ----------------------------------------------------------------------- where it lies


@pytest.mark.parametrize("where", ["OUT", "OUT/cache", "above OUT"])
def test_a_cache_that_overlaps_out_is_refused_before_any_work(models, tmp_path, where):
    out = tmp_path / "c" / "out" if where == "above OUT" else tmp_path / "out"
    cache = {"OUT": out, "OUT/cache": out / "cache", "above OUT": tmp_path / "c"}[where]
    result = run_cli(*heal_args(models, out, cache))
    assert_one_line_error(result, r"teacher cache .* overlaps OUT .*choose a directory outside OUT")
    assert not out.exists() and not cache.exists()


# -------------------------------------------------------------------------- disk full


def test_a_full_disk_while_writing_names_the_cache_not_out(models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    replace = os.replace

    def full_disk_in_cache(source, target):
        if str(target).startswith(str(cache)) and str(target).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_in_cache)
    result = run_cli(*heal_args(models, tmp_path / "out", cache))
    assert_one_line_error(
        result,
        rf"not enough space on the device of teacher cache {re.escape(str(cache))}: the cache needs about .* GB more",
    )
    assert not list(cache.glob("*.partial")) and not json.loads((cache / "cache.json").read_text())["complete"]


def full_disk(path):
    return shutil._ntuple_diskusage(1 << 40, 1 << 40, 0)


def test_a_cache_that_cannot_fit_is_refused_before_the_teacher_pass(models, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", full_disk)
    monkeypatch.setattr(teacher_cache, "_teacher_targets", lambda *args: pytest.fail("the teacher ran"))
    with pytest.raises(TeacherCacheError, match="not enough space on the device of teacher cache .*needs about"):
        build(tmp_path / "cache", models["teacher"], models["seq"])
    assert not (tmp_path / "cache").exists()


def _rank(rank, store, cache, teacher, sequences, results):
    """One torchrun-like rank: rank 0 finds its disk full, every rank records what it raised."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 0:
        shutil.disk_usage = full_disk
    try:
        prepare_teacher_cache(cache, teacher, sequences, SPEC, main=rank == 0, progress=False)
        message = "no error"
    except TeacherCacheError as error:
        message = str(error)
    with open(os.path.join(results, f"rank{rank}"), "w") as handle:
        handle.write(message)
    dist.destroy_process_group()


@pytest.mark.slow  # starts 2 processes
def test_every_rank_reports_why_rank_0_could_not_build_the_cache(models, tmp_path):
    cache = str(tmp_path / "cache")
    args = (str(tmp_path / "store"), cache, str(models["teacher"]), models["seq"], str(tmp_path))
    torch.multiprocessing.spawn(_rank, args=args, nprocs=2, join=True)
    zero, one = ((tmp_path / f"rank{r}").read_text() for r in (0, 1))
    assert zero.startswith(f"not enough space on the device of teacher cache {cache}:")
    assert one == f"rank 0 could not build the teacher cache {cache}: {zero}"


# --------------------------------------------------------------------- writing files


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_cache_files_get_the_users_usual_permissions(models, tmp_path, umask):
    previous = os.umask(umask)
    try:
        build(tmp_path / "cache", models["teacher"], models["seq"])
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "cache").iterdir()}
    assert len(modes) == 4  # cache.json and 3 chunks, no temporary file left
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_write_killed_before_its_rename_leaves_no_chunk(models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def killed(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("chunk_00001.safetensors.partial"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        build(cache, models["teacher"], models["seq"])
    assert (cache / "chunk_00001.safetensors.partial").exists() and not (cache / "chunk_00001.safetensors").exists()
    assert json.loads((cache / "cache.json").read_text())["complete"] is False


def test_an_interrupted_pass_resumes_after_its_last_intact_chunk(models, built, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    teacher_targets = teacher_cache._teacher_targets
    calls = []

    def interrupted_third(*args):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return teacher_targets(*args)

    monkeypatch.setattr(teacher_cache, "_teacher_targets", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        build(cache, models["teacher"], models["seq"])
    _truncate(cache / "chunk_00001.safetensors")  # damaged since: computed again, not trusted
    calls.clear()
    assert build(cache, models["teacher"], models["seq"])
    assert calls == [2, 1]  # chunk 0 reused; chunks 1 and 2 computed
    assert_same_targets(load(cache, models["teacher"], models["seq"]), load(built, models["teacher"], models["seq"]))
