# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""GPT-OSS (transposed, interleaved fused experts with biases) and the hybrid Qwen3-Next, streamed and merged."""

from __future__ import annotations

import pytest
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from helpers import logits_of, make_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.config import CalibrationConfig, ConfigError
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


def test_concat_of_all_experts_with_equal_gates_is_the_moe(calib_dir, tmp_path, tokenizer_dir):
    """Different experts, a constant router over all E = k experts (weights 1/E): `concat` of all of
    them with equal gates is the MoE itself, biases included (gate/up biases side by side, down
    biases summed, each scaled by its gate)."""
    moe = make_family_moe("gpt_oss", tmp_path / "moe", tokenizer_dir, router_std=0.0, num_experts_per_tok=4)
    out = tmp_path / "dense"
    build_dense(make_config(moe, "concat", calib_dir, num_experts=4, gates="equal"), str(out), OPTIONS)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 4 * 32


def test_refit_is_refused(random_gpt_oss, calib_dir, tmp_path):
    with pytest.raises(ConfigError, match="gpt_oss: the re-fit .* clamped SwiGLU: use refit: none") as error:
        build_dense(
            make_config(random_gpt_oss, "router_weighted", calib_dir, refit="down_proj"), str(tmp_path / "d"), OPTIONS
        )
    assert "\n" not in str(error.value)
