# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`writer.ShardWriter`: valid safetensors shards written as tensors come, memory bounded."""

from __future__ import annotations

import json
import os
import threading
import weakref

import pytest
import torch
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import make_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.graph import ReadTensor, SpilledTensors
from mergekit_moe2dense.graph.resources import graph_resources as open_readers
from mergekit_moe2dense.io import writer as writer_module
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.io.writer import ShardWriter, header_bytes_for


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype, a scalar, an empty and a non-contiguous tensor, each starting aligned to its size."""
    generator = torch.Generator().manual_seed(0)
    return {
        "c.scalar": torch.tensor(2.5, dtype=torch.float64),
        "e.ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "a.weight": torch.randn(7, 6, generator=generator).to(torch.bfloat16),
        "b.weight": torch.randn(3, 4, generator=generator),
        "d.empty": torch.zeros(0, 4),
        "g.half": torch.randn(2, 3, generator=generator).half(),
        "h.transposed": torch.randn(4, 6, generator=generator).t(),  # not contiguous
        "f.mask": torch.tensor([True, False, True]),
    }


def _read_all(directory) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(directory / shard)
        assert all(index["weight_map"][name] == shard for name in part)
        out.update(part)
    assert set(out) == set(index["weight_map"])
    return out


def test_one_shard_round_trips_every_dtype(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(str(tmp_path), header_bytes=header_bytes_for(tensors))
    for name, tensor in tensors.items():
        writer.save_tensor(name, tensor)
    writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = _read_all(tmp_path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


@pytest.mark.parametrize("max_shard_size", [1, 64, 200])
def test_shards_split_by_size_and_are_named_as_mergekit_names_them(tmp_path, max_shard_size):
    tensors = _tensors()
    writer = ShardWriter(str(tmp_path), max_shard_size=max_shard_size)
    for name, tensor in tensors.items():
        writer.save_tensor(name, tensor)
    writer.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count > 1
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shards, "model.safetensors.index.json"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = _read_all(tmp_path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    for shard in shards:  # no shard over the limit unless it holds one tensor
        part = load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= max_shard_size or len(part) == 1


def test_misaligned_tensor_starts_a_new_shard(tmp_path):
    """35 bf16 values end at byte 70: a float32 tensor there would not be 4-aligned."""
    writer = ShardWriter(str(tmp_path))
    writer.save_tensor("a", torch.ones(35, dtype=torch.bfloat16))
    writer.save_tensor("b", torch.ones(3, dtype=torch.float32))
    writer.save_tensor("c", torch.ones(2, dtype=torch.float32))
    writer.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["a"] != index["weight_map"]["b"] == index["weight_map"]["c"]


def test_full_header_starts_a_new_shard(tmp_path):
    names = [f"layer.{i}.weight" for i in range(6)]
    writer = ShardWriter(str(tmp_path))
    writer.header_bytes = 200  # room for two entries (below the writer's floor, to fill it)
    for name in names:
        writer.save_tensor(name, torch.full((2,), float(len(name))))
    writer.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert set(_read_all(tmp_path)) == set(names)


def test_saving_blocks_while_max_pending_bytes_wait(tmp_path, monkeypatch):
    """The queue holds at most max_pending bytes (or one tensor): the merge waits, memory stays bounded."""
    release = threading.Event()
    original = writer_module._Shard.write

    def slow(self, *args):
        release.wait(10)
        return original(self, *args)

    monkeypatch.setattr(writer_module._Shard, "write", slow)
    writer = ShardWriter(str(tmp_path), max_pending=100)
    writer.save_tensor("first", torch.zeros(20))  # 80 bytes: the thread holds it, blocked
    done = threading.Event()

    def second():
        writer.save_tensor("second", torch.zeros(20))  # 80 + 80 > 100: waits
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not done.wait(0.5)
    release.set()
    assert done.wait(10)
    thread.join()
    writer.finalize()
    assert set(load_file(tmp_path / "model.safetensors")) == {"first", "second"}


def test_write_error_reaches_the_merge(tmp_path, monkeypatch):
    def fail(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module._Shard, "write", fail)
    writer = ShardWriter(str(tmp_path))
    writer.save_tensor("a", torch.zeros(4))
    with pytest.raises(OSError, match="No space left"):
        writer.finalize()
    assert not writer._thread.is_alive()
    assert writer not in writer_module._OPEN


def test_merge_output_is_written_as_it_is_produced(random_moe, tmp_path, monkeypatch):
    """With nothing allowed to wait for the writer, at most a tensor or two of the output is alive at
    once (mergekit's writer held the whole shard), reads run in file order, and the model is the same."""
    moe = random_moe["legacy"]
    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": str(moe)}], "dtype": "float32"}
    )
    build_dense(config, str(tmp_path / "ref"), MergeOptions(quiet=True))

    alive, peak, saved = set(), [0], [0]
    original_save = ShardWriter.save_tensor

    def tracking(self, name, tensor, clone=False):
        alive.add(name)
        weakref.finalize(tensor, alive.discard, name)
        saved[0] += 1
        original_save(self, name, tensor, clone)
        peak[0] = max(peak[0], len(alive))

    order = []
    original_read = ReadTensor.execute

    def reading(self):
        order.append(self.tensor)
        return original_read(self)

    monkeypatch.setattr(writer_module, "MAX_PENDING_BYTES", 1)
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (5 * 10**9, writer_module.DEFAULT_HEADER_BYTES, 1))
    monkeypatch.setattr(ShardWriter, "save_tensor", tracking)
    monkeypatch.setattr(ReadTensor, "execute", reading)
    build_dense(config, str(tmp_path / "dense"), MergeOptions(quiet=True))

    assert saved[0] > 10 and peak[0] <= 3
    reader = SourceModel.open(config.model).reader
    positions = [reader.file_position(name) for name in order]
    assert positions == sorted(positions)
    assert not open_readers._readers and not writer_module._OPEN
    ref, dense = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "dense" / "model.safetensors")
    assert ref.keys() == dense.keys() and all(torch.equal(ref[k], dense[k]) for k in ref)


def test_refit_projections_wait_on_disk_not_in_memory(random_moe, calib_dir, tmp_path, monkeypatch):
    """The re-fit's down projections go to `SpilledTensors` files in the staging directory as each
    layer is fitted, reach the output unchanged, and the files are gone from the published model."""
    written = {}
    original = SpilledTensors.__setitem__

    def recording(self, name, tensor):
        written[name] = tensor.clone()
        original(self, name, tensor)
        assert not self._held and os.path.isfile(self._files[name])  # only a path is kept

    monkeypatch.setattr(SpilledTensors, "KEEP_BYTES", 0)  # nothing kept in memory
    monkeypatch.setattr(SpilledTensors, "__setitem__", recording)
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir, refit="down_proj")
    build_dense(config, str(tmp_path / "dense"), MergeOptions(quiet=True))
    source = SourceModel.open(config.model)
    downs = {source.family.dense_mlp_names(layer.index)["down"] for layer in source.moe_layers()}
    assert set(written) == downs
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert all(torch.equal(dense[name], written[name].to(dense[name].dtype)) for name in downs)
    assert not [p for p in (tmp_path / "dense").rglob("*") if ".fitted" in str(p)]


def test_spilled_tensors_keep_a_budget_in_memory_and_the_rest_on_disk(tmp_path):
    store = SpilledTensors(str(tmp_path / "spill"), keep_bytes=24)
    store["a"] = torch.arange(6.0).reshape(2, 3).t()  # 24 bytes, not contiguous: kept in memory
    store["b"] = torch.ones(2, dtype=torch.bfloat16)  # over the budget: on disk
    store["c"] = torch.ones(3, dtype=torch.int64)
    assert not (tmp_path / "spill" / "x").exists() and len(list((tmp_path / "spill").iterdir())) == 2
    assert sorted(store) == ["a", "b", "c"] and len(store) == 3
    assert torch.equal(store["a"], torch.arange(6.0).reshape(2, 3).t()) and store["b"].dtype == torch.bfloat16
    del store["b"]
    store["c"] = torch.zeros(1)  # replaced
    assert sorted(store) == ["a", "c"] and torch.equal(store["c"], torch.zeros(1))
    assert len(list((tmp_path / "spill").iterdir())) == 1
