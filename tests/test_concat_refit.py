# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""concat / max_contribution, expert contributions, and the layer-sequential re-fit."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from helpers import logits_of, recorded_and_plain_logits
from mergekit_moe2dense.build import WEIGHTS_FILE, build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches, load_moe
from mergekit_moe2dense.calibration.refit import DenseMLP, refit_layers
from mergekit_moe2dense.config import CalibrationConfig, ConfigError, Moe2DenseConfig
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.merge import assemble
from mergekit_moe2dense.plan import Block, LayerPlan, block_terms
from mergekit_moe2dense.refit import LeastSquaresStats, fit_down_proj

OPTIONS = MergeOptions(quiet=True)
CALIB = {"num_samples": 6, "seq_len": 24, "batch_size": 3}


def config(model, method, calib_dir, **params):
    return Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(model)}],
            "parameters": params,
            "calibration": {"dataset": str(calib_dir), **CALIB},
            "dtype": "float32",
        }
    )


def fixed_gate_logits(path, ids, gates):
    """The MoE with every router replaced by the same fixed gates over all experts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    num_experts = len(gates)
    for layer in model.model.layers:

        def router(hidden, _n=num_experts):
            tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            return (
                torch.zeros(tokens, _n),
                torch.tensor(gates).expand(tokens, _n),
                torch.arange(_n).expand(tokens, _n),
            )

        layer.mlp.gate.forward = router
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_concat_of_all_experts_is_the_fixed_gate_mixture(random_moe, calib_dir, tmp_path, layout):
    moe = random_moe[layout]
    out = tmp_path / "dense"
    build_dense(config(moe, "concat", calib_dir, num_experts=4, gates="equal", refit="none"), str(out), OPTIONS)
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 4 * 48
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = fixed_gate_logits(moe, ids, [0.25] * 4)
    torch.testing.assert_close(logits_of(out, ids), expected, rtol=0, atol=1e-5)
    assert (logits_of(moe, ids) - expected).abs().max() > 1e-2  # the fixed gates do change the model


def test_max_contribution_keeps_the_most_contributing_expert(random_moe, calib_dir, tmp_path):
    out = tmp_path / "dense"
    result = build_dense(config(random_moe["legacy"], "max_contribution", calib_dir), str(out), OPTIONS)
    best = result.statistics.mean_contribution.argmax(-1)
    assert result.layer_weights.argmax(-1).tolist() == best.tolist()
    assert result.layer_weights.max(-1).values.tolist() == [1.0, 1.0]
    assert (
        json.loads((out / WEIGHTS_FILE).read_text())["parameters"]["refit"] == "down_proj"
    )  # the default: the measured best re-fit
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 48
    assert not [p for p in out.iterdir() if p.name.startswith("refit")]


def test_contributions_match_a_direct_computation(random_moe, calib_dir):
    """sum over tokens of gate x ||expert output||, from the legacy per-expert tensors."""
    path = random_moe["legacy"]
    calibration = CalibrationConfig(dataset=str(calib_dir), max_token_samples=0, engine="full", **CALIB)
    _, batches = load_calibration_batches(str(path), calibration)
    model = load_moe(str(path), device="cpu", dtype=torch.float32)
    source = SourceModel.open(ModelReference.parse(str(path)))
    stats = collect_statistics(source, batches, calibration, progress=False)
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    loader = source.reference.lazy_loader()
    w = lambda e, n: loader.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.{n}.weight")  # noqa: E731
    expected = torch.zeros(4, dtype=torch.float64)
    for x, batch in zip(seen, batches):
        x = x.reshape(-1, x.shape[-1])[batch.attention_mask.reshape(-1).bool()]
        probs = torch.softmax(x @ loader.get_tensor("model.layers.1.block_sparse_moe.gate.weight").T, -1)
        top, index = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        for e in range(4):
            y = (torch.nn.functional.silu(x @ w(e, "w1").T) * (x @ w(e, "w3").T)) @ w(e, "w2").T
            expected[e] += float((top * (index == e)).sum(-1).double() @ y.double().norm(dim=-1))
    torch.testing.assert_close(stats.contribution_sum[1], expected, rtol=1e-4, atol=1e-6)


def test_block_terms_and_assemble(random_moe):
    """Each block's contributing experts (zero weights left out), weights and scale (down only),
    and `assemble` built on them: blocks merged, scaled, concatenated along the intermediate dim."""
    source = SourceModel.open(ModelReference.parse(str(random_moe["legacy"])))
    layer = source.moe_layers()[0]
    plan = LayerPlan(layer, (Block((0.5, 0.0, 0.5, 0.0), down_scale=2.0), Block((0.0, 0.0, 0.0, 1.0), down_scale=0.5)))
    gate, down = block_terms(plan, "gate"), block_terms(plan, "down")
    assert [t.experts for t in gate] == [(0, 2), (3,)] and [t.weights for t in gate] == [(0.5, 0.5), (1.0,)]
    assert [t.scale for t in gate] == [1.0, 1.0] and [t.scale for t in down] == [2.0, 0.5]
    assert down[0].slices == (layer.experts[0]["down"], layer.experts[2]["down"])
    loader = source.reference.lazy_loader()
    tensors = assemble(plan, lambda piece: piece.take(loader.get_tensor(piece.tensor)))
    w = lambda e, n: loader.get_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight")  # noqa: E731
    torch.testing.assert_close(tensors["gate"], torch.cat([0.5 * w(0, "w1") + 0.5 * w(2, "w1"), w(3, "w1")]))
    torch.testing.assert_close(tensors["down"], torch.cat([w(0, "w2") + w(2, "w2"), 0.5 * w(3, "w2")], dim=1))

    shared = {p: ExpertSlice(f"shared.{p}") for p in ("gate", "up", "down")}
    with_shared = MoELayer(0, layer.experts, layer.router, (), shared_experts=(shared,))
    terms = block_terms(LayerPlan(with_shared, (Block(shared=0, down_scale=0.25),)), "down")
    assert [(t.slices, t.experts, t.weights, t.scale, t.shared) for t in terms] == [
        ((shared["down"],), (), (1.0,), 0.25, 0)
    ]


def test_refit_needs_calibration_data(random_moe, tmp_path):
    bare = Moe2DenseConfig.model_validate(
        {
            "merge_method": "expert_uniform",
            "models": [{"model": str(random_moe["legacy"])}],
            "parameters": {"refit": "scale"},
        }
    )
    with pytest.raises(ConfigError, match=r"re-fit \(refit: scale, refit_gate_up: merge\) needs a calibration"):
        build_dense(bare, str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def _plans(source, weights):
    return [LayerPlan(layer, (Block(tuple(weights)),)) for layer in source.moe_layers()]


@pytest.mark.parametrize("weights, mode", [((0.0, 1.0, 0.0, 0.0), "scale"), ((0.25, 0.25, 0.25, 0.25), "down_proj")])
def test_refit_never_increases_the_layer_error(random_moe, calib_dir, weights, mode):
    path = random_moe["fused"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), CalibrationConfig(dataset=str(calib_dir), **CALIB))
    result = refit_layers(source, _plans(source, weights), batches, mode=mode, damping=1e-6, progress=False)
    assert sorted(result.errors) == [0, 1]
    for before, after in result.errors.values():
        assert after <= before + 1e-9
        if mode == "down_proj":  # the ridge fit has many more parameters than the scale
            assert after < 0.9 * before


def test_sequential_refit_equals_whole_model_fit(random_moe, calib_dir):
    """The streamed fit against a reference that keeps the whole model in memory
    and replaces its sparse blocks by fitted dense MLPs one layer at a time."""
    path = random_moe["legacy"]
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), CalibrationConfig(dataset=str(calib_dir), **CALIB))
    plans = _plans(source, (0.4, 0.3, 0.2, 0.1))
    streamed = refit_layers(source, plans, batches, mode="down_proj", damping=1e-4, progress=False)

    model = load_moe(str(path), device="cpu", dtype=torch.float32).eval()
    loader = source.reference.lazy_loader()
    for plan in plans:
        tensors = assemble(plan, lambda piece: piece.take(loader.get_tensor(piece.tensor)))
        dense = DenseMLP(tensors["gate"], tensors["up"], tensors["down"], torch.nn.functional.silu)
        stats, keep = LeastSquaresStats(), {}

        # bound now: the hook is removed before the next layer's loop rebinds these
        def hook(_module, inputs, output, stats=stats, dense=dense, keep=keep):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep["mask"]]
            stats.add_batch(dense.intermediate(x), output.reshape(-1, output.shape[-1])[keep["mask"]])

        layer = model.model.layers[plan.layer.index]
        handle = layer.mlp.register_forward_hook(hook)
        with torch.no_grad():
            for batch in batches:
                keep["mask"] = batch.attention_mask.reshape(-1).bool()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        handle.remove()
        dense.down = fit_down_proj(stats, 1e-4).float()
        layer.mlp = dense
        name = f"model.layers.{plan.layer.index}.mlp.down_proj.weight"
        torch.testing.assert_close(streamed.tensors[name], dense.down, rtol=1e-4, atol=1e-5)


def test_regmean_gate_up_through_build(random_moe, calib_dir, tmp_path):
    from safetensors import safe_open

    moe = random_moe["legacy"]
    outs = {}
    for gate_up in ("merge", "regmean"):
        out = tmp_path / gate_up
        params = {"refit": "down_proj", "refit_gate_up": gate_up}
        build_dense(config(moe, "expert_uniform", calib_dir, **params), str(out), OPTIONS)
        with safe_open(str(out / "model.safetensors"), "pt") as handle:
            outs[gate_up] = {k: handle.get_tensor(k) for k in handle.keys()}
    loader = SourceModel.open(ModelReference.parse(str(moe))).reference.lazy_loader()
    average = sum(loader.get_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)) / 4
    torch.testing.assert_close(outs["merge"]["model.layers.0.mlp.gate_proj.weight"], average)
    regmean = outs["regmean"]["model.layers.0.mlp.gate_proj.weight"]
    assert regmean.shape == average.shape and (regmean - average).abs().max() > 1e-3
    assert outs["regmean"]["model.layers.1.mlp.down_proj.weight"].shape == (32, 48)


def test_statistics_without_contributions_ask_for_recalibration(random_moe, calib_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mergekit_moe2dense.build import STATS_FILE
    from mergekit_moe2dense.statistics import StatisticsError

    moe = random_moe["legacy"]
    build_dense(config(moe, "router_weighted", calib_dir), str(tmp_path / "first"), OPTIONS)
    old = tmp_path / "old_stats.safetensors"
    with safe_open(str(tmp_path / "first" / STATS_FILE), "pt") as handle:  # as written before contributions
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "contribution_sum"}
        save_file(tensors, str(old), metadata=handle.metadata())
    with pytest.raises(StatisticsError, match="no expert contributions.*recalibrate"):
        build_dense(config(moe, "concat", calib_dir), str(tmp_path / "out"), OPTIONS, stats_path=str(old))
    build_dense(
        config(moe, "concat", calib_dir, score="frequency"), str(tmp_path / "freq"), OPTIONS, stats_path=str(old)
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recording_contributions_leaves_the_forward_unchanged(random_moe, calib_dir, dtype):
    """The recorder runs the experts once, on every (token, chosen expert) pair: the logits are
    the plain forward's bit for bit, the recorded contributions are the recomputing hook's, and
    on exit the experts modules have their class's forward again."""
    recorded, plain, stats, forwards = recorded_and_plain_logits(random_moe["fused"], calib_dir, dtype, True)
    recomputed, _, reference, _ = recorded_and_plain_logits(random_moe["fused"], calib_dir, dtype, False)
    assert all(torch.equal(a, b) and torch.equal(c, b) for a, b, c in zip(recorded, plain, recomputed))
    assert stats.contribution_sum.abs().sum() > 0
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(stats.contribution_sum, reference.contribution_sum, rtol=tolerance, atol=1e-6)
    assert forwards and all(forward is None for forward in forwards)  # the class's forward again


def test_recording_keeps_an_instances_own_forward(random_moe, calib_dir):
    calls = []

    def own_forward(forward):
        def hooked(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        return hooked

    recorded, plain, _, forwards = recorded_and_plain_logits(
        random_moe["fused"], calib_dir, torch.float32, True, own_forward
    )
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain)) and calls
    assert all(forward is not None and forward.__name__ == "hooked" for forward in forwards)
