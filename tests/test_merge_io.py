# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge reads every checkpoint byte once and holds one expert at a time."""

from __future__ import annotations

from math import prod

import pytest
import torch
from mergekit.options import MergeOptions

from helpers import state_of
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.graph.resources import graph_resources as open_readers
from mergekit_moe2dense.io.reader import TensorReader
from mergekit_moe2dense.io.source import SourceModel


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_each_byte_read_once_and_one_expert_alive_at_a_time(random_moe, tmp_path, monkeypatch, layout):
    """Every checkpoint tensor but the routers is read once (a fused gate_up_proj's gate and up
    rows are disjoint ranges, read by the gate and the up merge), and the merge holds one expert
    slice at a time, not a layer of experts: every expert is read into the same reused buffer."""
    moe = random_moe[layout]
    reads, expert_buffers = [], set()
    original = TensorReader._read_bytes

    def counting(self, piece, out=None):
        value = original(self, piece, out)
        path, start, dtype, shape = self._locate(piece)
        reads.append((piece.tensor, start, start + prod(shape) * dtype.itemsize))
        if ".experts." in piece.tensor:
            expert_buffers.add(value.untyped_storage().data_ptr())
        return value

    monkeypatch.setattr(TensorReader, "_read_bytes", counting)
    # The check before an averaging merge reads a few layers' experts once more (test_recommend.py);
    # what is counted here is the merge's own reads.
    monkeypatch.setattr("mergekit_moe2dense.job.check_expert_similarity", lambda *args: None)
    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": str(moe)}], "dtype": "float32"}
    )
    build_dense(config, str(tmp_path / "dense"), MergeOptions(quiet=True))

    source = SourceModel.open(config.model)
    layers = source.moe_layers()
    assert {name for name, _, _ in reads} == set(source.tensor_names) - {layer.router for layer in layers}
    for name in {name for name, _, _ in reads}:  # the byte ranges read of each tensor tile it exactly once
        ranges = sorted((start, end) for tensor, start, end in reads if tensor == name)
        _, first, dtype, shape = source.reader._locate(ExpertSlice(name))
        assert ranges[0][0] == first and ranges[-1][1] == first + prod(shape) * dtype.itemsize
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), name
    assert len(expert_buffers) == 1  # each expert is added to the sum before the next is read
    assert not open_readers._readers  # the run's readers (and read-ahead threads) are closed


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_direct_reads_merge_the_same_model(random_moe, tmp_path, monkeypatch, layout):
    """With O_DIRECT reads of every tensor (here however small) the merged model is the same bit
    for bit as with plain reads, and every expert slice comes through a direct read."""
    from mergekit_moe2dense.io import reader as checkpoint
    from mergekit_moe2dense.io.direct import DirectFile

    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": str(random_moe[layout])}], "dtype": "float32"}
    )
    monkeypatch.setattr(DirectFile, "open", classmethod(lambda cls, path: None))
    build_dense(config, str(tmp_path / "plain"), MergeOptions(quiet=True))
    monkeypatch.undo()

    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 0)
    direct_reads = []
    read = DirectFile.read

    def counting(self, start, nbytes, buffer):
        direct_reads.append((start, nbytes))
        return read(self, start, nbytes, buffer)

    monkeypatch.setattr(DirectFile, "read", counting)
    build_dense(config, str(tmp_path / "direct"), MergeOptions(quiet=True))
    if not direct_reads:
        pytest.skip("no O_DIRECT on this file system")
    layers = SourceModel.open(config.model).moe_layers()
    assert len(direct_reads) >= sum(len(layer.experts) * 3 for layer in layers)
    plain, direct = state_of(tmp_path / "plain"), state_of(tmp_path / "direct")
    assert plain.keys() == direct.keys()
    for key in plain:
        assert torch.equal(plain[key], direct[key]), key
