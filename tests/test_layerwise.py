# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-streaming engine against the whole-model forward."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from mergekit.common import ModelReference

from helpers import dead_pid
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.io import reader as checkpoint
from mergekit_moe2dense.io.direct import DirectFile
from mergekit_moe2dense.io.source import SourceModel


def calibration(calib_dir, **values):
    return CalibrationConfig(
        dataset=str(calib_dir), num_samples=7, seq_len=24, batch_size=3, max_token_samples=50, seed=3, **values
    )


@pytest.mark.parametrize(
    "layout, spill, direct", [("legacy", False, False), ("fused", True, False), ("legacy", False, True)]
)
def test_layerwise_statistics_equal_full_forward(random_moe, calib_dir, tmp_path, monkeypatch, layout, spill, direct):
    """`direct`: every tensor the stream loads read from the disk with O_DIRECT, in chunks."""
    path = random_moe[layout]
    direct_reads = []
    if direct:
        if DirectFile.open(str(next(path.glob("*.safetensors")))) is None:
            pytest.skip("no O_DIRECT on this file system")
        monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 0)
        monkeypatch.setattr(checkpoint, "DIRECT_CHUNK_BYTES", 4096)
        monkeypatch.setattr(DirectFile, "resident", lambda self, start, end: False)
        read = DirectFile.read
        monkeypatch.setattr(DirectFile, "read", lambda self, *args: direct_reads.append(1) or read(self, *args))
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding is exercised
    source = SourceModel.open(ModelReference.parse(str(path)))
    full = collect_statistics(source, batches, calibration(calib_dir, engine="full"), progress=False)
    spill_dir = str(tmp_path / "acts") if spill else None
    streamed = collect_statistics(
        source, batches, calibration(calib_dir, engine="layerwise", spill_dir=spill_dir), progress=False
    )
    assert streamed.tokens == full.tokens > 0
    for name in ("logit_sum", "prob_sum", "selected", "gate_sum", "contribution_sum", "samples"):
        torch.testing.assert_close(getattr(streamed, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    assert full.samples.abs().sum() > 0
    assert bool(direct_reads) == direct
    if spill:
        assert not any((tmp_path / "acts").iterdir())  # spilled activations are removed


def test_spill_directory_is_named_with_host_and_pid_and_dead_ones_are_removed(
    random_moe, calib_dir, tmp_path, monkeypatch
):
    """A stream killed with SIGKILL leaves its spilled activations; the next stream on this host
    removes them, never a live process's nor those of another host (ranks may share spill_dir)."""
    from mergekit_moe2dense.calibration import LayerStream
    from mergekit_moe2dense.calibration.layerwise import spill_prefix

    prefix = spill_prefix()
    assert socket.gethostname() in prefix
    dead = dead_pid()
    kept = [f"{prefix}{os.getppid()}", f"moe2dense-acts-other-host-{dead}"]
    for name in [f"{prefix}{dead}", *kept]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "batch000000.pt").write_bytes(b"")
    path = random_moe["legacy"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    with LayerStream(source, batches, spill_dir=str(tmp_path)):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, f"{prefix}{os.getpid()}"])
        assert len(os.listdir(tmp_path / f"{prefix}{os.getpid()}")) == len(batches)  # layer 0's inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)

    def fail():
        raise RuntimeError("the embedding pass failed")

    monkeypatch.setattr(LayerStream, "_embed", lambda self: fail())
    with pytest.raises(RuntimeError), LayerStream(source, batches, spill_dir=str(tmp_path)):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)  # a stream that failed to start too


def test_build_with_layerwise_engine_matches_full(random_moe, calib_dir, tmp_path):
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig

    results = {}
    for engine in ("full", "layerwise"):
        config = Moe2DenseConfig.model_validate(
            {
                "merge_method": "router_weighted",
                "models": [{"model": str(random_moe["legacy"])}],
                "calibration": {"dataset": str(calib_dir), "num_samples": 6, "seq_len": 24, "engine": engine},
                "dtype": "float32",
            }
        )
        results[engine] = build_dense(config, str(tmp_path / engine), MergeOptions(quiet=True)).layer_weights
    torch.testing.assert_close(results["layerwise"], results["full"], rtol=1e-6, atol=1e-9)


def test_device_map_places_the_full_model_with_accelerate(random_moe, calib_dir, tmp_path, monkeypatch):
    """`device_map` goes to from_pretrained (accelerate; here everything lands on the CPU) and
    gives the same statistics; it is refused where it cannot apply."""
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.calibration import calibration_engine, collect_statistics, load_calibration_batches, runner
    from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig

    def config(**calibration):
        return Moe2DenseConfig.model_validate(
            {
                "merge_method": "router_weighted",
                "models": [{"model": str(random_moe["legacy"])}],
                "calibration": {"dataset": str(calib_dir), "num_samples": 6, "seq_len": 24, **calibration},
            }
        )

    maps = []
    load = runner.load_moe

    def spy(path, **kwargs):
        maps.append(kwargs["device_map"])
        return load(path, **kwargs)

    monkeypatch.setattr("mergekit_moe2dense.calibration.engine.load_moe", spy)
    source = SourceModel.open(ModelReference.parse(str(random_moe["legacy"])))
    options = MergeOptions(quiet=True)
    _, batches = load_calibration_batches(source.path, config().calibration)
    placed = collect_statistics(source, batches, config(device_map="auto").calibration, progress=False)
    plain = collect_statistics(source, batches, config(engine="full").calibration, progress=False)
    assert maps == ["auto", None]
    for name in ("prob_sum", "selected", "gate_sum", "samples"):
        torch.testing.assert_close(getattr(placed, name), getattr(plain, name), rtol=1e-6, atol=1e-6)
    assert calibration_engine(source, config(device_map="auto").calibration, "cpu") == "full"

    with pytest.raises(ConfigError, match="device_map"):
        build_dense(config(device_map="auto", engine="layerwise"), str(tmp_path / "a"), options)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="device_map"):
        build_dense(config(device_map="auto"), str(tmp_path / "b"), options)
    assert not list(tmp_path.iterdir())


def test_layer_loop_calls_back_in_order_and_carries_the_converted_states(random_moe, calib_dir):
    """`LayerStream.run`: prepare_layer sees the loaded layer and its inputs, extra passes leave
    the carried states alone, swaps hold only for the advancing forward, after_layer sees the
    freed layer and its outputs; and with every sparse block swapped for a dense MLP the carried
    states are those of a full forward of the converted dense model (what the re-fit relies on)."""
    from mergekit_moe2dense.calibration import LayerStream, LayerVisitor, load_moe
    from mergekit_moe2dense.calibration.refit import DenseMLP
    from mergekit_moe2dense.merge import assemble
    from mergekit_moe2dense.plan import Block, LayerPlan

    path = random_moe["fused"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    family, loader = source.family, source.reference.lazy_loader()
    block_path = {i: family.router_module(i).rsplit(".", 1)[0] for i in range(2)}

    def dense_mlp(layer):
        tensors = assemble(
            LayerPlan(layer, (Block((0.1, 0.2, 0.3, 0.4)),)), lambda p: p.take(loader.get_tensor(p.tensor))
        )
        return DenseMLP(tensors["gate"], tensors["up"], tensors["down"], torch.nn.functional.silu)

    dense = {layer.index: dense_mlp(layer) for layer in source.moe_layers()}

    class Converting(LayerVisitor):
        def __init__(self):
            self.events, self.inputs, self.outputs = [], {}, {}

        def prepare_layer(self, stream, index, layer):
            self.events.append(("prepare", index))
            assert not any(p.is_meta for p in layer.parameters())
            self.inputs[index] = [stream.inputs(b).clone() for b in range(len(batches))]
            seen = []
            stream.forward(layer, advance=False, before_batch=seen.append)
            assert seen == list(range(len(batches)))
            assert all(torch.equal(stream.inputs(b), x) for b, x in enumerate(self.inputs[index]))
            return {block_path[index]: dense[index]}

        def before_batch(self, batch):
            self.events.append(("batch", batch))

        def after_layer(self, stream, index):
            self.events.append(("after", index))
            assert all(p.is_meta for p in stream.layers[index].parameters())
            assert not isinstance(stream.model.get_submodule(block_path[index]), DenseMLP)
            self.outputs[index] = [stream.inputs(b).clone() for b in range(len(batches))]

    visitor = Converting()
    with LayerStream(source, batches) as stream:
        stream.run(visitor, progress=False)
    n = len(batches)
    assert visitor.events == [
        event for i in range(2) for event in [("prepare", i), *(("batch", b) for b in range(n)), ("after", i)]
    ]

    model = load_moe(str(path), device="cpu", dtype=torch.float32).eval()
    outputs = {i: [] for i in range(2)}
    for i, layer in enumerate(model.model.layers):
        model.set_submodule(block_path[i], dense[i])
        layer.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for b in range(n):
        torch.testing.assert_close(visitor.inputs[1][b], outputs[0][b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(visitor.outputs[1][b], outputs[1][b], rtol=1e-5, atol=1e-5)
    # the dense swap changed the carried states: the MoE's own layer 0 gives other inputs to layer 1
    with LayerStream(source, batches) as stream:
        stream.run(LayerVisitor(), progress=False)
        moe_out = stream.inputs(0)
    assert (moe_out - visitor.outputs[1][0]).abs().max() > 1e-3


def test_bf16_stream_computes_layers_in_float32(random_moe, calib_dir, tmp_path, caplog, monkeypatch):
    """A bfloat16 calibration streamed with `compute_dtype: float32` (what `auto` picks on a CPU
    without native bfloat16 matmuls) carries the activations in bfloat16: on a bfloat16 checkpoint its first layer's
    statistics are the float32 forward's, and all are closer to them than the bfloat16
    whole-model forward's; `compute_dtype: bfloat16` computes in bfloat16 (the whole-model
    forward's figures). The dtypes are logged and saved with the statistics."""
    import logging

    import transformers

    from helpers import save_model

    stored = str(random_moe["legacy"])
    path = save_model(  # stored in bfloat16, as released MoEs are
        transformers.AutoModelForCausalLM.from_pretrained(stored, dtype=torch.bfloat16),
        transformers.AutoTokenizer.from_pretrained(stored),
        tmp_path / "bf16",
        "legacy",
    )
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    source = SourceModel.open(ModelReference.parse(str(path)))

    def stats(**values):
        return collect_statistics(source, batches, calibration(calib_dir, **values), progress=False)

    monkeypatch.setattr("mergekit_moe2dense.calibration.layerwise.native_16bit_matmul", lambda dtype: False)
    reference = stats(engine="full", dtype="float32")
    full_bf16 = stats(engine="full", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="mergekit_moe2dense.calibration.layerwise"):
        streamed = stats(engine="layerwise", dtype="bfloat16")
    streamed_bf16 = stats(engine="layerwise", dtype="bfloat16", compute_dtype="bfloat16")
    names = ("logit_sum", "prob_sum", "contribution_sum")

    def error(result, layer=slice(None)):
        return max(
            float(
                (getattr(result, n)[layer] - getattr(reference, n)[layer]).abs().max()
                / getattr(reference, n).abs().max()
            )
            for n in names
        )

    assert error(full_bf16) > 1e-3  # bfloat16 arithmetic is visible on this model
    assert error(streamed, 0) < 1e-6  # layer 0's inputs (the embeddings) are exact in bfloat16
    assert error(streamed) < 0.3 * error(full_bf16)  # later layers: the carried states' rounding only
    for n in names:
        torch.testing.assert_close(getattr(streamed_bf16, n), getattr(full_bf16, n), rtol=1e-5, atol=1e-5)
    assert streamed.metadata == {"engine": "layerwise", "dtype": "bfloat16", "compute_dtype": "float32"}
    assert streamed_bf16.metadata["compute_dtype"] == "bfloat16"
    assert full_bf16.metadata == {"engine": "full", "dtype": "bfloat16", "compute_dtype": "bfloat16"}
    assert "layers computed in float32, activations carried in bfloat16" in caplog.text


def test_stream_carries_activations_in_the_calibration_dtype(random_moe, calib_dir, monkeypatch):
    """The float32 compute is per layer: the carried states stay in the calibration dtype (their
    memory), the streamed layer and its inputs are float32. `auto` computes 16-bit calibrations in
    float32 only on a CPU without native 16-bit matmuls; explicit and GPU choices are kept."""
    from mergekit_moe2dense.calibration import LayerStream, compute_dtype
    from mergekit_moe2dense.calibration.layerwise import layer_compute_dtype, native_16bit_matmul

    assert native_16bit_matmul(torch.float32) is False
    native = native_16bit_matmul(torch.bfloat16)
    auto = calibration(calib_dir, dtype="bfloat16")
    assert compute_dtype(auto, "cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr("mergekit_moe2dense.calibration.layerwise.native_16bit_matmul", lambda dtype: False)
    assert compute_dtype(auto, "cpu") == torch.float32
    assert compute_dtype(calibration(calib_dir, dtype="bfloat16", compute_dtype="bfloat16"), "cpu") == torch.bfloat16

    path = random_moe["fused"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    with LayerStream(source, batches, dtype=torch.bfloat16) as stream:
        assert stream.compute_dtype == torch.float32
        layer = stream.load_layer(0)
        assert {p.dtype for p in layer.parameters()} == {torch.float32}
        stream.forward(layer)
        assert all(stream._hidden[b].dtype == torch.bfloat16 for b in range(len(batches)))
        assert stream.inputs(0).dtype == torch.float32
    assert layer_compute_dtype(torch.bfloat16, "cuda:0", native=False) == torch.bfloat16
    assert layer_compute_dtype(torch.float16, "cpu", native=False) == torch.float32
    assert layer_compute_dtype(torch.bfloat16, "cpu", native=True) == torch.bfloat16
    assert layer_compute_dtype(torch.bfloat16, "cpu", torch.bfloat16, native=False) == torch.bfloat16
    assert layer_compute_dtype(torch.float32, "cpu", native=False) == torch.float32


def test_next_layer_reuses_the_freed_layers_memory_but_not_what_is_held(random_moe, calib_dir, monkeypatch):
    """A freed layer's tensors become the next layer's parameters of the same shape (no fresh
    pages to fault in per layer), read from the checkpoint like new ones; a tensor something
    else still holds (a visitor's reference, a view) keeps its memory and its values."""
    from mergekit_moe2dense.calibration import LayerStream

    path = random_moe["fused"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), calibration(calib_dir))
    with LayerStream(source, batches) as stream:
        layer = stream.load_layer(0)
        experts = layer.mlp.experts
        reused = experts.gate_up_proj.data_ptr()
        held = experts.down_proj  # a visitor keeps a parameter
        view = layer.self_attn.q_proj.weight[:2]  # and a view of another
        held_values, view_values = held.detach().clone(), view.clone()
        stream.free_layer(0)
        fresh, empty_like = [], torch.empty_like
        monkeypatch.setattr(torch, "empty_like", lambda t, **kw: fresh.append(tuple(t.shape)) or empty_like(t, **kw))
        layer = stream.load_layer(1)
        monkeypatch.undo()
        # new memory only for the two tensors held (every parameter of layer 0 is of its shape)
        assert sorted(fresh) == sorted([tuple(held.shape), tuple(layer.self_attn.q_proj.weight.shape)])
        assert layer.mlp.experts.gate_up_proj.data_ptr() == reused
        assert layer.mlp.experts.down_proj.data_ptr() != held.data_ptr()
        assert layer.self_attn.q_proj.weight.data_ptr() != view.data_ptr()
        assert torch.equal(held, held_values) and torch.equal(view, view_values)
        for name, value in layer.named_parameters():  # every parameter is layer 1's, as stored
            stored = f"model.layers.1.{name}".replace("mlp.experts", "block_sparse_moe.experts")
            if stored in source.index.tensor_paths:
                assert torch.equal(value, source.reader.read(stored)), name
        assert torch.equal(
            layer.mlp.experts.gate_up_proj, stream._reader.read("model.layers.1.mlp.experts.gate_up_proj")
        )
        assert not stream._reusable  # what was not taken is not kept
