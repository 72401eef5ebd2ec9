# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`refit: fit`: the gradient fit of the whole dense MLP, layer by layer."""

from __future__ import annotations

import random

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import TEXT, assert_one_line_error, logits_of, make_config, run_cli, write_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import load_calibration_batches
from mergekit_moe2dense.calibration.refit import refit_layers
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.methods import get_method
from mergekit_moe2dense.methods.base import MethodError
from mergekit_moe2dense.plan import Block, LayerPlan
from mergekit_moe2dense.refit import FitSettings, fit_mlp, gated_hidden, mlp_error, mlp_forward
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
CALIB = {"num_samples": 6, "seq_len": 24, "batch_size": 3}
SILU = torch.nn.functional.silu


def _teacher(hidden=16, width=32, tokens=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (
        torch.randn(width, hidden, generator=g) / hidden**0.5,
        torch.randn(width, hidden, generator=g) / hidden**0.5,
    )
    down = torch.randn(hidden, width, generator=g) / width**0.5
    x = torch.randn(tokens, hidden, generator=g)
    y = (SILU(x @ gate.T) * (x @ up.T)) @ down.T
    return x, y, (gate, up, down), g


def test_fit_recovers_a_known_mlp():
    x, y, teacher, g = _teacher()
    start = [w + 0.3 * w.std() * torch.randn(w.shape, generator=g) for w in teacher]
    fit = fit_mlp(x, y, *start, SILU, FitSettings(steps=1500, lr=2e-2, batch_tokens=256))
    assert fit.start_error > 0.05  # the perturbation is large ...
    assert fit.best_error < 1e-3  # ... and the fit undoes it on tokens it never trained on
    assert mlp_error(x, y, fit.gate, fit.up, fit.down, SILU) < 1e-3
    assert fit.best_step > 1000 and fit.holdout_tokens == 300


def test_fit_never_ends_worse_than_its_start():
    x, y, teacher, g = _teacher(seed=1)
    start = [w + 0.05 * w.std() * torch.randn(w.shape, generator=g) for w in teacher]
    # a step of the weights' own RMS: every step diverges, the start is kept as it was
    fit = fit_mlp(x, y, *start, SILU, FitSettings(steps=20, lr=1.0, batch_tokens=64))
    assert fit.best_step == 0 and fit.best_error == fit.start_error
    for got, want in zip((fit.gate, fit.up, fit.down), start):
        assert torch.equal(got, want)
    # a sane step size improves on it, never worse on the held-out tokens
    fit = fit_mlp(x, y, *start, SILU, FitSettings(steps=50, lr=1e-2, batch_tokens=64))
    assert 0 < fit.best_step and fit.best_error < fit.start_error


def test_fit_needs_two_tokens():
    x, y, teacher, _ = _teacher(tokens=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        fit_mlp(x, y, *teacher, SILU, FitSettings(steps=1))


def _stream_fit(path, calib_dir, **kwargs):
    source = SourceModel.open(ModelReference.parse(str(path)))
    _, batches = load_calibration_batches(str(path), CalibrationConfig(dataset=str(calib_dir), **CALIB))
    plans = [LayerPlan(layer, (Block((0.4, 0.3, 0.2, 0.1)),)) for layer in source.moe_layers()]
    settings = FitSettings(steps=40, lr=1e-2, batch_tokens=32)
    return refit_layers(source, plans, batches, mode="fit", damping=1e-4, fit=settings, progress=False, **kwargs)


def test_layer_sequential_fit_improves_on_least_squares(random_moe, calib_dir, tmp_path):
    fitted = _stream_fit(random_moe["fused"], calib_dir)
    assert sorted(fitted.errors) == sorted(fitted.heldout) == sorted(fitted.seconds) == [0, 1]
    names = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")}
    assert set(fitted.tensors) == names
    for start, end in fitted.heldout.values():
        assert end < start  # held-out: better than the least-squares start
    for merged, end in fitted.errors.values():
        assert end < merged
    # the spilled carried states give the very same fit
    spilled = _stream_fit(random_moe["fused"], calib_dir, spill_dir=str(tmp_path / "spill"))
    for name, tensor in fitted.tensors.items():
        torch.testing.assert_close(spilled.tensors[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["expert_uniform", "concat"])
def test_fit_through_build_keeps_an_exact_start(identical_moe, calib_dir, tmp_path, method):
    """Identical experts: the merge and its least-squares down re-fit are the MoE, the
    gradient steps can only move away from it on held-out tokens, so the start is kept."""
    moe = identical_moe["legacy"]
    out = tmp_path / "dense"
    params = {"refit": "fit", "fit_steps": 20, "fit_batch_tokens": 64, "refit_damping": 1e-9}
    build_dense(make_config(moe, method, calib_dir, **params), str(out), OPTIONS)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(out, ids), logits_of(moe, ids), rtol=0, atol=1e-4)


def test_fit_covers_shared_expert_blocks(tokenizer_dir, tmp_path):
    """Qwen2-MoE: the dense MLP is the routed block and the shared expert side by side;
    the fit moves both (on enough distinct tokens to generalise to the held-out ones)."""
    moe = make_family_moe("qwen2_moe", tmp_path / "moe", tokenizer_dir, seed=3)
    words, rng = TEXT.split(), random.Random(0)  # shuffled words: many distinct contexts
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "words.txt").write_text("\n\n".join(" ".join(rng.choices(words, k=40)) for _ in range(64)))
    out = {}
    for refit in ("down_proj", "fit"):
        extra = {"fit_steps": 100, "fit_lr": 0.03, "fit_batch_tokens": 256} if refit == "fit" else {}
        config = make_config(moe, "expert_uniform", tmp_path / "calib", refit=refit, **extra)
        config = config.model_copy(update={"calibration": config.calibration.model_copy(update={"num_samples": 64})})
        build_dense(config, str(tmp_path / refit), OPTIONS)
        with safe_open(str(tmp_path / refit / "model.safetensors"), "pt") as handle:
            out[refit] = {k: handle.get_tensor(k) for k in handle.keys() if ".mlp." in k}
    for layer in (1, 2):  # layer 0 is dense in the tiny qwen2_moe
        for projection in ("gate", "up"):
            name = f"model.layers.{layer}.mlp.{projection}_proj.weight"
            start, fitted = out["down_proj"][name], out["fit"][name]
            assert fitted.shape == (24 + 16, 32)  # the routed block and the shared expert
            changed = (fitted - start).abs().amax(dim=1) > 0
            assert bool(changed.all()), f"{name}: rows left unfitted"


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"refit": "fit", "fit_steps": 0}, r"fit_steps=0: Input should be greater than or equal to 1"),
        ({"refit": "fit", "fit_lr": -1.0}, r"fit_lr=-1.0: Input should be greater than 0"),
        ({"refit": "fit", "fit_holdout": 0.0}, r"fit_holdout=0.0: Input should be greater than 0"),
        ({"refit": "fit", "fit_holdout": 0.9}, r"fit_holdout=0.9: Input should be less than or equal to 0.5"),
        ({"refit": "fit", "fit_batch_tokens": 0}, r"fit_batch_tokens=0: Input should be greater than or equal to 1"),
        ({"refit": "down_proj", "fit_steps": 10}, r"fit_steps=10: Value error, only used with refit: fit"),
        ({"fit_lr": 0.1}, r"fit_lr=0.1: Value error, only used with refit: fit"),
        ({"refit": "fitted"}, r"refit='fitted': Input should be 'none', 'scale', 'down_proj' or 'fit'"),
    ],
)
def test_fit_parameters_are_validated(params, fragment):
    with pytest.raises(MethodError, match=fragment) as error:
        get_method("router_weighted").resolve_parameters(params, num_experts=4, top_k=2)
    assert "\n" not in str(error.value)


def test_fit_parameters_error_on_the_command_line(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, "concat", refit="fit", fit_lr=2.0)
    assert_one_line_error(run_cli(config, tmp_path / "out"), r"fit_lr=2.0: Input should be less than or equal to 1")
    assert not (tmp_path / "out").exists()


def test_fit_parameters_are_recorded_only_with_fit():
    method = get_method("max_contribution")
    plain = method.resolve_parameters({"refit": "down_proj"}, num_experts=4, top_k=2).model_dump()
    assert not any(key.startswith("fit_") for key in plain)
    fitted = method.resolve_parameters({"refit": "fit", "fit_steps": 7}, num_experts=4, top_k=2).model_dump()
    assert fitted["fit_steps"] == 7 and fitted["fit_lr"] == 0.1 and fitted["fit_holdout"] == 0.1


def test_fit_moves_biases_from_zero_through_a_given_activation():
    """A known MLP with biases, f(x) = D h(G x + b_g, U x + b_u) + b_d, through `hidden`: from the
    right matrices and zero biases (a step of lr * rms(start) would never move them) the fit
    recovers the function on held-out tokens, which the matrices alone cannot."""
    x, _, (gate, up, down), g = _teacher(seed=2)
    true = {"gate_bias": 0.5 * torch.randn(32, generator=g), "up_bias": 0.5 * torch.randn(32, generator=g)}
    true["down_bias"] = torch.randn(16, generator=g)
    hidden = gated_hidden(SILU)
    y = mlp_forward(x, {"gate": gate, "up": up, "down": down, **true}, hidden)
    zeros = {name: torch.zeros_like(b) for name, b in true.items()}
    fit = fit_mlp(
        x, y, gate, up, down, None, FitSettings(steps=1500, lr=2e-2, batch_tokens=256), biases=zeros, hidden=hidden
    )
    assert fit.start_error > 0.1 and fit.best_error < 1e-3
    assert set(fit.biases) == set(true)
    for name, bias in true.items():  # each moved from 0 (the matrices, fitted too, may trade with them)
        assert float(fit.biases[name].norm()) > 0.3 * float(bias.norm()), name
    # without the biases the same fit stays far off: they are what it fitted
    plain = fit_mlp(x, y, gate, up, down, SILU, FitSettings(steps=300, lr=2e-2, batch_tokens=256))
    assert plain.best_error > 100 * fit.best_error
    assert mlp_error(x, y, fit.gate, fit.up, fit.down, None, biases=fit.biases, hidden=hidden) < 1e-3
