# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""GPT-OSS (transposed, interleaved fused experts with biases) and the hybrid Qwen3-Next, streamed and merged."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from helpers import logits_of, make_config, save_model
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.calibration.refit import DenseMLP, refit_layers
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.plan import Block, LayerPlan
from mergekit_moe2dense.refit import FitSettings
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def random_gpt_oss(tmp_path_factory, tokenizer_dir):
    return make_family_moe("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "moe", tokenizer_dir)


def test_slices_read_each_expert_as_its_linear_weights(random_gpt_oss):
    """gate = even columns of gate_up[e], transposed to [I, H]; up = odd; down [H, I]; biases alike."""
    source = SourceModel.open(ModelReference.parse(str(random_gpt_oss)))
    layer = source.moe_layers()[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(random_gpt_oss)
    experts = model.model.layers[1].mlp.experts
    for e in (0, 3):
        piece = {p: source.reader.read_slice(s) for p, s in layer.experts[e].items()}
        torch.testing.assert_close(piece["gate"], experts.gate_up_proj[e][:, 0::2].T, rtol=0, atol=0)
        torch.testing.assert_close(piece["up"], experts.gate_up_proj[e][:, 1::2].T, rtol=0, atol=0)
        torch.testing.assert_close(piece["down"], experts.down_proj[e].T, rtol=0, atol=0)
        torch.testing.assert_close(piece["gate_bias"], experts.gate_up_proj_bias[e][0::2], rtol=0, atol=0)
        torch.testing.assert_close(piece["up_bias"], experts.gate_up_proj_bias[e][1::2], rtol=0, atol=0)
        torch.testing.assert_close(piece["down_bias"], experts.down_proj_bias[e], rtol=0, atol=0)
    assert "model.layers.1.mlp.router.bias" in layer.consumed


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_next"])
def test_layerwise_statistics_equal_full_forward(family, calib_dir, tmp_path, tokenizer_dir):
    """The stream fills GPT-OSS's transposed, interleaved in-memory tensors and biases from the
    checkpoint, and passes each layer its own mask (sliding / full; linear / full attention)."""
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir)

    def calibration(engine):
        return CalibrationConfig(
            dataset=str(calib_dir), num_samples=6, seq_len=24, batch_size=3, max_token_samples=50, engine=engine
        )

    _, batches = load_calibration_batches(str(moe), calibration("full"))
    source = SourceModel.open(ModelReference.parse(str(moe)))
    full = collect_statistics(source, batches, calibration("full"), progress=False)
    streamed = collect_statistics(source, batches, calibration("layerwise"), progress=False)
    for name in ("logit_sum", "gate_sum", "contribution_sum", "samples"):
        torch.testing.assert_close(getattr(streamed, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    assert full.contribution_sum.abs().sum() > 0


def _constant_router_moe(tmp_path, tokenizer_dir):
    """Different experts with biases, a constant router over all E = k experts (weights 1/E)."""
    constant = make_family_moe("gpt_oss", tmp_path / "src", tokenizer_dir, router_std=0.0, num_experts_per_tok=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(constant)
    with torch.no_grad():  # router_std=0 leaves the expert biases 0 too: draw them
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.1)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.1)
    return save_model(model, transformers.AutoTokenizer.from_pretrained(constant), tmp_path / "moe", "legacy")


def test_concat_of_all_experts_with_equal_gates_is_the_moe(calib_dir, tmp_path, tokenizer_dir):
    """Different experts, a constant router over all E = k experts (weights 1/E): `concat` of all of
    them with equal gates is the MoE itself, biases included (gate/up biases side by side, down
    biases summed, each scaled by its gate)."""
    moe = _constant_router_moe(tmp_path, tokenizer_dir)
    out = tmp_path / "dense"
    build_dense(make_config(moe, "concat", calib_dir, num_experts=4, gates="equal"), str(out), OPTIONS)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 4 * 32


@pytest.fixture(scope="module")
def identical_gpt_oss(tmp_path_factory, tokenizer_dir):
    return make_family_moe("gpt_oss", tmp_path_factory.mktemp("gpt_oss_same") / "moe", tokenizer_dir, identical=True)


def _loaded(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_dense_mlp_of_one_expert_is_that_expert_clamps_included(random_gpt_oss):
    """The re-fit's dense MLP of expert 3's projections and biases, through GPT-OSS's `dense_hidden`
    (its clamped SwiGLU on them as a one-expert module, interleaved and transposed), computes what
    GptOssExperts does for that expert, on inputs large enough that both clamps act."""
    source = SourceModel.open(ModelReference.parse(str(random_gpt_oss)))
    experts = transformers.AutoModelForCausalLM.from_pretrained(random_gpt_oss).model.layers[1].mlp.experts
    projections = {p: source.reader.read_slice(s) for p, s in source.moe_layers()[1].experts[3].items()}
    biases = {p: projections.pop(p) for p in ("gate_bias", "up_bias", "down_bias")}
    dense = DenseMLP(
        *(projections[p] for p in ("gate", "up", "down")), None, biases, source.family.dense_hidden(experts, 1)
    )
    x = 40 * torch.randn(64, experts.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[3] + experts.gate_up_proj_bias[3]
        assert (gate_up[:, ::2] > experts.limit).any() and (gate_up[:, 1::2].abs() > experts.limit).any()
        want = experts(x, torch.full((64, 1), 3), torch.ones(64, 1))
        torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {"refit": "down_proj"},
        {"refit": "scale"},
        {"refit": "fit", "fit_steps": 20, "fit_batch_tokens": 64},
        {"refit": "none", "refit_gate_up": "regmean"},
        {"refit": "down_proj", "refit_gate_up": "regmean"},
    ],
    ids=lambda params: "-".join(map(str, params.values())),
)
def test_refit_of_identical_experts_gives_the_moe(identical_gpt_oss, calib_dir, tmp_path, params):
    """Identical experts (biases too): the merged MLP is the MoE's block, so the least-squares
    optimum over [D, b_d] on the features [h, 1] is the true down projection and bias, every scale
    is 1, RegMean of equal [W, b] is that, and the fit keeps its exact start: the MoE's logits."""
    out = tmp_path / "dense"
    build_dense(
        make_config(identical_gpt_oss, "router_weighted", calib_dir, refit_damping=1e-9, **params), str(out), OPTIONS
    )
    _loaded(out)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(identical_gpt_oss, IDS), rtol=0, atol=1e-4)


@pytest.mark.parametrize("refit", ["down_proj", "scale"])
def test_refit_of_the_exact_concat_keeps_it_exact(calib_dir, tmp_path, tokenizer_dir, caplog, refit):
    """`concat` of all experts with equal gates on a constant router is the MoE (gate/up biases side
    by side, down biases summed, each times its gate): the re-fit's in-memory MLP is assembled the
    same way (error 0 before the fit), so its optimum is that MLP and the output is the MoE's."""
    moe = _constant_router_moe(tmp_path, tokenizer_dir)
    out = tmp_path / "dense"
    params = dict(num_experts=4, gates="equal", refit=refit, refit_damping=1e-9)
    with caplog.at_level(logging.INFO, logger="mergekit_moe2dense.outputs.dense"):
        build_dense(make_config(moe, "concat", calib_dir, **params), str(out), OPTIONS)
    errors = _refit_errors(caplog.text)
    assert sorted(errors) == [0, 1, 2] and all(before < 1e-9 and after < 1e-9 for before, after in errors.values())
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-4)


def _refit_errors(text: str) -> dict[int, tuple[float, float]]:
    pattern = r"layer (\d+): relative MLP reconstruction error (\S+) -> (\S+) after refit"
    return {int(m[1]): (float(m[2]), float(m[3])) for m in re.finditer(pattern, text)}


@pytest.mark.parametrize("refit", ["down_proj", "scale", "fit"])
def test_refit_lowers_every_layer_error_of_a_random_gpt_oss(random_gpt_oss, calib_dir, tmp_path, caplog, refit):
    """Different experts: every layer's block error after the re-fit is below the merged MLP's
    (refit: none's) on the same carried states; the fit never ends worse than its least-squares
    start on its held-out tokens; the output loads clean, its fitted biases written fused."""
    out = tmp_path / refit
    extra = {"fit_steps": 60, "fit_batch_tokens": 64, "fit_lr": 0.03} if refit == "fit" else {}
    with caplog.at_level(logging.INFO, logger="mergekit_moe2dense.outputs.dense"):
        build_dense(make_config(random_gpt_oss, "router_weighted", calib_dir, refit=refit, **extra), str(out), OPTIONS)
    errors = _refit_errors(caplog.text)
    assert sorted(errors) == [0, 1, 2]
    assert all(after < before for before, after in errors.values()), errors
    if refit == "fit":
        pattern = r"layer \d+: held-out relative error (\S+) \(least-squares start\) -> (\S+) \(refit: fit\)"
        heldout = [(float(m[1]), float(m[2])) for m in re.finditer(pattern, caplog.text)]
        assert len(heldout) == 3 and all(end <= start for start, end in heldout), heldout
    dense = _loaded(out)
    assert dense.config.num_local_experts == 1
    build_dense(make_config(random_gpt_oss, "router_weighted", calib_dir), str(tmp_path / "none"), OPTIONS)
    merged = _loaded(tmp_path / "none")
    for index in range(3):  # the written down bias is the fitted one, not the merge's weighted sum
        bias = dense.model.layers[index].mlp.experts.down_proj_bias
        assert not torch.allclose(bias, merged.model.layers[index].mlp.experts.down_proj_bias, atol=1e-4)


def test_fitted_projections_and_biases_are_written_as_the_one_fused_expert(random_gpt_oss, calib_dir, tmp_path):
    """refit: fit gives every projection and bias of the dense MLP (by the dense target's names);
    the conversion writes exactly those as expert 0 of GPT-OSS's layout: gate the even, up the odd
    columns of gate_up_proj [1, H, 2I] (transposed), down_proj [1, I, H], the biases alike."""
    params = {"refit": "fit", "fit_steps": 30, "fit_lr": 0.03, "fit_batch_tokens": 32}
    config = make_config(random_gpt_oss, "expert_uniform", calib_dir, **params)
    build_dense(config, str(tmp_path / "dense"), OPTIONS)
    source = SourceModel.open(ModelReference.parse(str(random_gpt_oss)))
    _, batches = load_calibration_batches(str(random_gpt_oss), config.calibration)
    plans = [LayerPlan(layer, (Block((0.25,) * 4),)) for layer in source.moe_layers()]
    settings = FitSettings(steps=30, lr=0.03, batch_tokens=32)
    fitted = refit_layers(source, plans, batches, mode="fit", damping=1e-4, fit=settings, progress=False).tensors
    suffixes = ("", "_bias")
    names = {
        f"model.layers.{i}.mlp.experts.{p}_proj{b}" for i in range(3) for p in ("gate", "up", "down") for b in suffixes
    }
    assert set(fitted) == names
    experts = _loaded(tmp_path / "dense").model.layers
    for index in range(3):
        written = experts[index].mlp.experts
        want = {p: fitted[f"model.layers.{index}.mlp.experts.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}
        bias = {p: fitted[f"model.layers.{index}.mlp.experts.{p}_bias"] for p in ("gate_proj", "up_proj", "down_proj")}
        got = {
            "gate_proj": written.gate_up_proj[0][:, 0::2].T,
            "up_proj": written.gate_up_proj[0][:, 1::2].T,
            "down_proj": written.down_proj[0].T,
        }
        got_bias = {
            "gate_proj": written.gate_up_proj_bias[0][0::2],
            "up_proj": written.gate_up_proj_bias[0][1::2],
            "down_proj": written.down_proj_bias[0],
        }
        for p in want:
            torch.testing.assert_close(got[p], want[p], rtol=0, atol=0)
            torch.testing.assert_close(got_bias[p], bias[p], rtol=0, atol=0)
