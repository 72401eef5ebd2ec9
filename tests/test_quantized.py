# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Quantized checkpoints (block-wise FP8, MXFP4) dequantized on read by the one checkpoint reader."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import (
    expand_blocks,
    logits_of,
    make_config,
    quantize_fp8_checkpoint,
    quantize_mxfp4_checkpoint,
    save_dequantized,
)
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import ExpertSlice, UnsupportedModelError, get_family
from mergekit_moe2dense.io import ShapeMismatchError
from mergekit_moe2dense.io.index import read_index
from mergekit_moe2dense.io.reader import TensorReader
from mergekit_moe2dense.io.source import SourceModel
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
BLOCK = (16, 16)  # 128 x 128 in the releases; 16 gives several blocks, and partial ones (24 = 16 + 8), here


@pytest.fixture(scope="module")
def fp8_moes(tmp_path_factory, tokenizer_dir):
    """layout -> (float MoE, its FP8 copy, the exactly dequantized MoE, the dequantized tensors)."""
    root = tmp_path_factory.mktemp("fp8")
    moes = {}
    for layout in ("legacy", "fused"):
        moe = make_family_moe("qwen3_moe", root / f"moe-{layout}", tokenizer_dir, identical=True, layout=layout)
        quantized, reference = quantize_fp8_checkpoint(moe, root / f"fp8-{layout}", BLOCK)
        moes[layout] = (moe, quantized, save_dequantized(moe, root / f"deq-{layout}", reference), reference)
    return moes


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_fp8_dequantizes_to_the_reference_within_the_format_error(fp8_moes, layout):
    moe, quantized, _, reference = fp8_moes[layout]
    reader = TensorReader(read_index(str(quantized)))
    with (
        safe_open(str(moe / "model.safetensors"), "pt") as original,
        safe_open(str(quantized / "model.safetensors"), "pt") as stored,
    ):
        assert any(name.endswith("experts.gate_up_proj") or ".experts.0." in name for name in reference)
        for name, exact in reference.items():
            value = reader.read(name, dtype=torch.float32)
            torch.testing.assert_close(value, exact, rtol=0, atol=0)  # transformers' dequantization, bit for bit
            weight = original.get_tensor(name)
            scale = expand_blocks(stored.get_tensor(name + "_scale_inv"), weight.shape, BLOCK)
            # e4m3: 3 mantissa bits (relative error <= 2**-4), subnormal spacing 2**-9 of the block scale
            assert bool(((value - weight).abs() <= weight.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()), name
            assert reader.shape(ExpertSlice(name)) == tuple(weight.shape)
    assert not any(name.endswith("_scale_inv") for name in reader.index.tensor_paths)  # scales are no model tensors


@pytest.mark.parametrize("layout", ["legacy", "fused"])
@pytest.mark.parametrize("engine", ["auto", "layerwise"])
def test_fp8_checkpoint_converts_to_the_dequantized_moe(fp8_moes, calib_dir, tmp_path, layout, engine):
    """Identical experts: the dense model of the FP8 checkpoint gives the dequantized MoE's logits."""
    _, quantized, dequantized, _ = fp8_moes[layout]
    config = _with_engine(make_config(quantized, "router_weighted", calib_dir), engine)
    out = tmp_path / "dense"
    build_dense(config, str(out), OPTIONS)
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["architectures"] == ["Qwen3ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
        assert not any("scale_inv" in name for name in names)
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    torch.testing.assert_close(logits_of(out, IDS), logits_of(dequantized, IDS), rtol=0, atol=1e-5)


def test_fp8_full_engine_is_refused(fp8_moes, calib_dir, tmp_path):
    config = _with_engine(make_config(fp8_moes["legacy"][1], "router_weighted", calib_dir), "full")
    with pytest.raises(ConfigError, match="engine: layerwise") as error:
        build_dense(config, str(tmp_path / "dense"), OPTIONS)
    assert "\n" not in str(error.value)


def test_fp8_scales_that_contradict_the_blocks_are_refused(fp8_moes, tmp_path):
    quantized = fp8_moes["legacy"][1]
    raw = json.loads((quantized / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in quantized.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    raw["quantization_config"]["weight_block_size"] = [8, 8]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ShapeMismatchError, match=r"_scale_inv has shape .* \(weight_block_size \[8, 8\]\)"):
        SourceModel.open(ModelReference.parse(str(broken)))


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", "fbgemm_fp8"])
def test_other_quantization_formats_are_refused(method):
    with pytest.raises(UnsupportedModelError, match=f"quantization_config: {method}.*FP8.*MXFP4") as error:
        get_family(transformers.Qwen3MoeConfig(quantization_config={"quant_method": method}))
    assert "\n" not in str(error.value)


def _with_engine(config, engine: str):
    return config.model_copy(update={"calibration": config.calibration.model_copy(update={"engine": engine})})


@pytest.fixture(scope="module")
def mxfp4_moe(tmp_path_factory, tokenizer_dir):
    """(float GPT-OSS, its MXFP4 copy, the exactly dequantized GPT-OSS, the dequantized tensors)."""
    root = tmp_path_factory.mktemp("mxfp4")
    moe = make_family_moe("gpt_oss", root / "moe", tokenizer_dir, identical=True)
    quantized, reference = quantize_mxfp4_checkpoint(moe, root / "mxfp4")
    return moe, quantized, save_dequantized(moe, root / "deq", reference), reference


def test_mxfp4_dequantizes_to_the_reference_within_the_format_error(mxfp4_moe):
    moe, quantized, _, reference = mxfp4_moe
    reader = TensorReader(read_index(str(quantized)))
    assert len(reference) == 2 * 3  # gate_up and down of every layer
    with safe_open(str(moe / "model.safetensors"), "pt") as original:
        for name, exact in reference.items():
            assert name in reader.index.tensor_paths and name + "_blocks" not in reader.index.tensor_paths
            value = reader.read(name, dtype=torch.float32)
            torch.testing.assert_close(value, exact, rtol=0, atol=0)  # transformers' dequantization, bit for bit
            for expert in (0, 3):  # one expert's bytes only, in the model's dtype (config.json: float32)
                torch.testing.assert_close(reader.read_slice(ExpertSlice(name, expert)), exact[expert], rtol=0, atol=0)
            torch.testing.assert_close(reader.read(name, dtype=torch.bfloat16), exact.bfloat16(), rtol=0, atol=0)
            weight = original.get_tensor(name)
            assert reader.shape(ExpertSlice(name)) == tuple(weight.shape)
            # E2M1 with a shared power-of-two scale per 32 inputs: error <= half the group's largest magnitude
            groups = weight.transpose(1, 2).unflatten(-1, (-1, 32))
            bound = (groups.abs().amax(-1, keepdim=True) / 2).expand_as(groups).flatten(-2).transpose(1, 2)
            assert bool(((value - weight).abs() <= bound + 1e-12).all()), name


@pytest.mark.parametrize("engine", ["auto", "layerwise"])
def test_mxfp4_gpt_oss_converts_to_the_dequantized_moe(mxfp4_moe, calib_dir, tmp_path, engine):
    _, quantized, dequantized, _ = mxfp4_moe
    out = tmp_path / "dense"
    build_dense(_with_engine(make_config(quantized, "router_weighted", calib_dir), engine), str(out), OPTIONS)
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written
    assert (written["num_local_experts"], written["num_experts_per_tok"]) == (1, 1)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not any(name.endswith(("_blocks", "_scales")) for name in handle.keys())
    torch.testing.assert_close(logits_of(out, IDS), logits_of(dequantized, IDS), rtol=0, atol=1e-5)
