# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""TensorReader: plain reads of whole tensors and expert slices, either shard format."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from safetensors.torch import save_file

from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io import reader as checkpoint
from mergekit_moe2dense.io.direct import AlignedBuffer, DirectFile
from mergekit_moe2dense.io.reader import TensorReader

E, I, H = 3, 5, 4


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "fused.gate_up_proj": torch.randn(E, 2 * I, H, generator=generator).to(torch.bfloat16),
        "fused.down_proj": torch.randn(E, H, I, generator=generator).to(torch.bfloat16),
        "norm.weight": torch.randn(H, generator=generator),
        "step": torch.tensor([7], dtype=torch.int64),  # (mergekit cannot lazy-unpickle 0-d tensors)
    }


def write(path, tensors, fmt):
    path.mkdir()
    if fmt == "safetensors":
        save_file(tensors, os.fspath(path / "model.safetensors"))
    else:
        torch.save(tensors, path / "pytorch_model.bin")
    return TensorReader(ShardedTensorIndex.from_disk(os.fspath(path)))


PIECES = [
    ExpertSlice("fused.gate_up_proj", expert=1, rows=(0, I)),
    ExpertSlice("fused.gate_up_proj", expert=2, rows=(I, 2 * I)),
    ExpertSlice("fused.down_proj", expert=0),
    ExpertSlice("fused.down_proj", expert=2, rows=(1, 3)),
    ExpertSlice("norm.weight"),
    ExpertSlice("step"),
]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reads_equal_the_stored_tensors(tmp_path, tensors, fmt):
    reader = write(tmp_path / "model", tensors, fmt)
    for name, value in tensors.items():
        assert torch.equal(reader.read(name), value)
    for piece in PIECES:
        expected = piece.take(tensors[piece.tensor])
        got = reader.read_slice(piece)
        assert got.dtype == expected.dtype and torch.equal(got, expected), piece
        assert reader.shape(piece) == tuple(expected.shape)
        into = torch.full(expected.shape, -1.0, dtype=torch.float64)  # another dtype: converted
        assert reader.read_slice(piece, out=into) is into
        torch.testing.assert_close(into, expected.double(), rtol=0, atol=0)


def test_reads_into_a_view_of_a_larger_tensor(tmp_path, tensors):
    reader = write(tmp_path / "model", tensors, "safetensors")
    target = torch.zeros(E, 2 * I, H, dtype=torch.bfloat16)
    for e in range(E):  # the layer-streaming engine's fill of a fused parameter
        reader.read_slice(ExpertSlice("fused.gate_up_proj", expert=e, rows=(0, I)), out=target[e, :I])
        reader.read_slice(ExpertSlice("fused.gate_up_proj", expert=e, rows=(I, 2 * I)), out=target[e, I:])
    assert torch.equal(target, tensors["fused.gate_up_proj"])


def test_shape_mismatch_and_truncation_are_errors(tmp_path, tensors):
    reader = write(tmp_path / "model", tensors, "safetensors")
    with pytest.raises(CheckpointError, match="checkpoint shape"):
        reader.read("fused.down_proj", out=torch.empty(E, H, I + 1, dtype=torch.bfloat16))
    with pytest.raises(KeyError):
        reader.read("missing")
    shard = tmp_path / "model" / "model.safetensors"
    os.truncate(shard, os.path.getsize(shard) - 8)  # after the reader saw a whole shard
    last = max(tensors, key=lambda name: reader._locate(ExpertSlice(name))[1])
    with pytest.raises(CheckpointError, match="ended inside"):
        reader.read(last)


def test_read_ahead_reads_the_same_and_stops_on_close(tmp_path, tensors):
    plain = write(tmp_path / "model", tensors, "safetensors")
    index = plain.index
    with TensorReader(index, readahead=64) as ahead:  # a window smaller than one tensor, too
        thread = ahead._ahead.thread
        for piece in PIECES:
            assert torch.equal(ahead.read_slice(piece), plain.read_slice(piece))
    assert not thread.is_alive()


def test_read_transient_reuses_one_buffer_and_reads_the_same(tmp_path, tensors):
    reader = write(tmp_path / "model", tensors, "safetensors")
    buffers = set()
    for piece in PIECES:
        value = reader.read_transient(piece)
        assert torch.equal(value, reader.read_slice(piece)) and value.dtype == reader.read_slice(piece).dtype
        buffers.add(value.untyped_storage().data_ptr())
    assert len(buffers) == 1  # grown once to the largest piece read first, or reused
    first = reader.read_transient(PIECES[0])
    kept = first.clone()
    reader.read_transient(PIECES[2])
    assert not torch.equal(first, kept)  # valid until the next read only: the buffer was reused


def test_prefetch_reads_the_first_bytes_in_file_order(tmp_path, monkeypatch):
    from mergekit_moe2dense.io import prefetch

    model = tmp_path / "model"
    model.mkdir()
    for name, size in [("b.safetensors", 3 << 20), ("a.safetensors", 5 << 20), ("notes.txt", 1 << 20)]:
        (model / name).write_bytes(b"\0" * size)
    opened, reads = [], []
    real_open, real_preadv = os.open, os.preadv
    monkeypatch.setattr(prefetch.os, "open", lambda path, flags: opened.append(path) or real_open(path, flags))
    monkeypatch.setattr(
        prefetch.os, "preadv", lambda fd, bufs, at: reads.append((at, len(bufs[0]))) or real_preadv(fd, bufs, at)
    )
    prefetch.prefetch_model_start(str(model), 6 << 20).join()
    assert opened == [str(model / "a.safetensors"), str(model / "b.safetensors")]  # name order, shards only
    assert all(size <= prefetch.CHUNK for _, size in reads)
    assert sum(size for _, size in reads) == 6 << 20  # all of a, then 1 MB of b
    assert prefetch.prefetch_model_start(str(tmp_path / "missing"), 1 << 20) is None
    stop = iter([True, False])
    with open(model / "a.safetensors", "rb") as handle:  # stops when told
        scratch = memoryview(bytearray(prefetch.CHUNK))
        assert prefetch.read_into_cache(handle.fileno(), 0, 5 << 20, scratch, lambda: next(stop)) == prefetch.CHUNK
    assert prefetch.available_memory() > 0


@pytest.fixture
def direct_reader(tmp_path, tensors, monkeypatch):
    """A reader with O_DIRECT reads of every piece (however small), or a skip where tmp_path's
    file system has none."""
    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 0)
    plain = write(tmp_path / "model", tensors, "safetensors")
    reader = TensorReader(plain.index, readahead=1 << 20, direct=True)
    if reader._direct is None:
        pytest.skip("no O_DIRECT on this file system")
    yield reader
    reader.close()


@pytest.mark.parametrize("cached", [False, True])
def test_direct_reads_equal_the_stored_tensors(direct_reader, tensors, monkeypatch, cached):
    """From the disk (O_DIRECT over the aligned range around each piece) or, for pages the page
    cache holds, with plain reads: the same bytes; no page-cache read-ahead beside them."""
    monkeypatch.setattr(DirectFile, "resident", lambda self, start, end: cached)
    assert direct_reader._ahead is None
    for name, value in tensors.items():
        assert torch.equal(direct_reader.read(name), value)
    for piece, value in zip(PIECES, direct_reader.read_many(PIECES)):
        expected = piece.take(tensors[piece.tensor])
        assert value.dtype == expected.dtype and torch.equal(value, expected), piece


def test_read_many_reads_ahead_into_two_reused_buffers(direct_reader, tmp_path):
    """The next piece is read while the caller holds this one: two buffers, used in turn, so a
    piece is valid until the next is taken, not longer; a caller that stops early leaves no read
    running."""
    wide = torch.randn(E, 2048, generator=torch.Generator().manual_seed(1))  # experts 8 KB apart
    reader = TensorReader(write(tmp_path / "wide", {"wide": wide}, "safetensors").index, direct=True)
    pieces = [ExpertSlice("wide", expert=e) for e in range(E)] * 2
    taken = []
    for piece, value in zip(pieces, reader.read_many(pieces)):
        assert torch.equal(value, wide[piece.expert])
        taken.append(value)
    # pieces 0, 2, 4 share one buffer, 1, 3, 5 the other: piece 0's view shows what piece 4 (expert 1)
    # read into it last, at the same page offset
    assert torch.equal(taken[0], wide[1]) and torch.equal(taken[1], wide[2])

    stopped = reader.read_many(pieces)
    next(stopped)
    stopped.close()  # waits for the read ahead of piece 1
    assert reader._worker.submit(lambda: "idle").result(timeout=5) == "idle"
    reader.close()


def test_direct_reads_in_chunks_cast_into_place(tmp_path, monkeypatch):
    """A tensor larger than a chunk, read a chunk at a time (the next on the worker thread) into
    the caller's tensor of another dtype, into a strided one, and into a fresh one: the stored
    values, as the plain reader gives them; a shape that is not the checkpoint's is an error."""
    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "DIRECT_CHUNK_BYTES", 4096)  # 2048 bf16 values per chunk
    monkeypatch.setattr(DirectFile, "resident", lambda self, start, end: False)
    stored = torch.randn(7, 1531, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)  # 5.2 chunks
    plain = write(tmp_path / "model", {"pad": torch.ones(3), "big": stored}, "safetensors")  # unaligned start
    reader = TensorReader(plain.index, direct=True)
    if reader._direct is None:
        pytest.skip("no O_DIRECT on this file system")
    try:
        assert torch.equal(reader.read("big"), stored)
        into = torch.empty(7, 1531)  # float32: cast chunk by chunk
        assert reader.read("big", out=into) is into and torch.equal(into, stored.float())
        strided = torch.empty(1531, 7, dtype=torch.float64).t()
        assert reader.read("big", out=strided) is strided and torch.equal(strided, stored.double())
        rows = ExpertSlice("big", rows=(2, 5))
        assert torch.equal(reader.read_slice(rows, out=torch.empty(3, 1531)), stored[2:5].float())
        with pytest.raises(CheckpointError, match="checkpoint shape"):
            reader.read("big", out=torch.empty(7, 1530))
    finally:
        reader.close()


def test_direct_reads_of_a_truncated_shard_are_errors(direct_reader, tensors, tmp_path):
    shard = tmp_path / "model" / "model.safetensors"
    os.truncate(shard, os.path.getsize(shard) - 8)
    last = max(tensors, key=lambda name: direct_reader._locate(ExpertSlice(name))[1])
    with pytest.raises(CheckpointError, match="ended inside"):
        direct_reader.read(last)
    with pytest.raises(CheckpointError, match="ended inside"):
        list(direct_reader.read_many([ExpertSlice(last)]))


def test_without_o_direct_the_reader_reads_plainly_and_ahead(tmp_path, tensors, monkeypatch):
    """A file system without O_DIRECT (tmpfs): plain reads, with the page-cache read-ahead."""
    monkeypatch.setattr(DirectFile, "open", classmethod(lambda cls, path: None))
    plain = write(tmp_path / "model", tensors, "safetensors")
    with TensorReader(plain.index, readahead=1 << 20, direct=True) as reader:
        assert reader._direct is None and reader._ahead is not None
        for piece, value in zip(PIECES, reader.read_many(PIECES)):
            assert torch.equal(value, plain.read_slice(piece))


def open_direct(tmp_path, nbytes):
    """A DirectFile over `nbytes` random bytes, with them, or a skip without O_DIRECT."""
    path = tmp_path / "data"
    payload = os.urandom(nbytes)
    path.write_bytes(payload)
    file = DirectFile.open(os.fspath(path))
    if file is None:
        pytest.skip("no O_DIRECT on this file system")
    return file, payload


def test_direct_file_sees_the_page_cache(tmp_path):
    """`resident` is true for bytes just read plainly; an unaligned read at the end of a file (its
    aligned range past the end) returns exactly those bytes."""
    file, payload = open_direct(tmp_path, 3 * 4096 + 123)
    try:
        os.pread(file.plain_fd, len(payload), 0)
        assert file.resident(0, len(payload))
        buffer = AlignedBuffer()
        for resident in (True, False):
            file.resident = lambda start, end, resident=resident: resident
            memory, offset = file.read(4096 + 5, len(payload) - 4096 - 5, buffer)
            assert bytes(memory[offset : offset + len(payload) - 4096 - 5]) == payload[4096 + 5 :]
    finally:
        file.close()


def test_direct_file_reads_plainly_once_o_direct_reads_fail(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses the reads (EINVAL): the same bytes,
    read plainly from then on."""
    from mergekit_moe2dense.io import direct as direct_io

    file, payload = open_direct(tmp_path, 2 * 4096 + 17)
    read_fully, refused = direct_io._read_fully, []

    def refuse_direct(fd, view, offset, stop_at_eof=False):
        if fd == file.direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return read_fully(fd, view, offset, stop_at_eof)

    monkeypatch.setattr(direct_io, "_read_fully", refuse_direct)
    file.resident = lambda start, end: False
    try:
        for _ in range(2):
            memory, offset = file.read(100, 5000, AlignedBuffer())
            assert bytes(memory[offset : offset + 5000]) == payload[100:5100]
        assert len(refused) == 1 and file.plain_only
    finally:
        file.close()
