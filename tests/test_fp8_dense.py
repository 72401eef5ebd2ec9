# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Dense outputs in block-wise FP8 (`output_quantization: fp8`): every linear weight of the decoder
layers in float8_e4m3fn with a scale per block, within the format's error of the `none` output's
tensor; everything else that output's bytes; loadable by transformers (dequantized on a CPU) with
logits near the `none` output's; about half the bytes of bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from helpers import (
    expand_blocks,
    logits_of,
    make_config,
    quantize_fp8_checkpoint,
)
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig
from mergekit_moe2dense.job import ConversionJob
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
# whole blocks of every tiny qwen3_moe weight (hidden 32, MLPs 24 and 40, heads 8 x 4): transformers
# dequantizes FP8 on a CPU only where the blocks divide the weight
BLOCK = (8, 8)
# the largest logit difference from the `none` output allowed (measured: 0.033 from the float MoE,
# 0.0054 from its FP8 copy, logits of standard deviation 0.11 and at most 0.43)
LOGITS_ATOL = 0.05
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def dense_config(model: Path, calib_dir, quantization: str | None, block=BLOCK) -> Moe2DenseConfig:
    config = make_config(model, "expert_uniform", calib_dir)
    update = {"out_dtype": "bfloat16", "output_quantization": quantization}
    if quantization == "fp8":
        update["output_block_size"] = block
    return config.model_copy(update=update)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer_dir, calib_dir):
    """A random tiny qwen3_moe and its FP8 copy, each converted to a dense model written in FP8 and
    dequantized: by name, the output directory."""
    root = tmp_path_factory.mktemp("fp8-dense")
    moe = make_family_moe("qwen3_moe", root / "moe", tokenizer_dir)
    fp8_source, _ = quantize_fp8_checkpoint(moe, root / "fp8-source", BLOCK)
    outputs = {}
    for name, model, quantization in (
        ("fp8", moe, "fp8"),
        ("none", moe, "none"),
        ("default", moe, None),
        ("fp8-of-fp8", fp8_source, "fp8"),
        ("none-of-fp8", fp8_source, "none"),
    ):
        outputs[name] = root / name
        build_dense(dense_config(model, calib_dir, quantization), str(outputs[name]), OPTIONS)
    return outputs


def _linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.removesuffix(".weight").endswith(PROJECTIONS)


@pytest.mark.parametrize("pair", [("fp8", "none"), ("fp8-of-fp8", "none-of-fp8")])
def test_each_linear_weight_is_fp8_within_the_format_error(dense, pair):
    """Every decoder-layer projection in e4m3 with a float32 scale per block, dequantizing to the
    `none` output's tensor within 2**-4 |w| + 2**-10 s; nothing else quantized."""
    out, none = tensors(dense[pair[0]]), tensors(dense[pair[1]])
    linear = [name for name in none if _linear(name)]
    assert len(linear) == 3 * len(PROJECTIONS)
    assert {n for n, v in out.items() if v.dtype == torch.float8_e4m3fn} == set(linear)
    assert set(out) == set(none) | {name + "_scale_inv" for name in linear}
    for name in linear:
        data, scales, exact = out[name], out[name + "_scale_inv"], none[name].float()
        assert scales.dtype == torch.float32 and scales.shape == (exact.shape[0] // 8, exact.shape[1] // 8)
        value = _dequantize_fp8_weight(data, scales, list(BLOCK), torch.float32)
        bound = exact.abs() * 2**-4 + expand_blocks(scales, exact.shape, BLOCK) * 2**-10
        assert bool(((value - exact).abs() <= bound).all()), name


@pytest.mark.parametrize("pair", [("fp8", "none"), ("fp8-of-fp8", "none-of-fp8")])
def test_the_other_tensors_are_the_none_outputs_bytes(dense, pair):
    """Embeddings, norms, lm_head: as the dequantized output writes them, bit for bit."""
    out, none = tensors(dense[pair[0]]), tensors(dense[pair[1]])
    others = [name for name in none if not _linear(name)]
    assert any("embed_tokens" in n for n in others) and any("norm" in n for n in others) and "lm_head.weight" in others
    for name in others:
        assert same_bytes(out[name], none[name]), name


def test_the_config_has_transformers_fine_grained_fp8(dense):
    written = json.loads((dense["fp8"] / "config.json").read_text())
    assert written["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head"],
    }
    assert written["dtype"] == "bfloat16"


@pytest.mark.parametrize("pair", [("fp8", "none"), ("fp8-of-fp8", "none-of-fp8")])
def test_fp8_loads_in_transformers_with_logits_near_the_none_outputs(dense, pair):
    """transformers dequantizes FP8 on a CPU as it loads (its warning says so): plain float linear
    layers, and the `none` output's logits within LOGITS_ATOL."""
    model = transformers.AutoModelForCausalLM.from_pretrained(dense[pair[0]], dtype=torch.float32).eval()
    projection = model.model.layers[1].mlp.down_proj
    assert type(projection) is torch.nn.Linear and projection.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    difference = (logits - logits_of(dense[pair[1]], IDS)).abs().max()
    assert 0 < difference < LOGITS_ATOL


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_a_one_expert_targets_experts_module_is_left_unquantized(family, tokenizer_dir, calib_dir, tmp_path):
    """Where the dense target keeps its MLP as a one-expert experts module (OLMoE, GPT-OSS, MiniMax-M2),
    that module stays in out_dtype and `modules_to_not_convert` lists it; attention is FP8."""
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir)
    outs = {}
    for quantization in ("fp8", "none"):
        config = make_config(moe, "expert_uniform", calib_dir).model_copy(
            update={"output_quantization": quantization, "output_block_size": (2, 2) if quantization == "fp8" else None}
        )
        outs[quantization] = tmp_path / quantization
        build_dense(config, str(outs[quantization]), OPTIONS)
    written = tensors(outs["fp8"])
    quantized = {name for name, value in written.items() if value.dtype == torch.float8_e4m3fn}
    assert quantized and all(".self_attn." in name for name in quantized)
    skipped = json.loads((outs["fp8"] / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.mlp.experts" in skipped and "lm_head" in skipped
    difference = (logits_of(outs["fp8"], IDS) - logits_of(outs["none"], IDS)).abs().max()
    assert 0 < difference < LOGITS_ATOL


def test_fp8_weights_take_about_half_the_bytes_of_bfloat16(dense):
    """The projections: a byte a value plus a float32 scale a block (4 / 64 bytes a value here, 4 / 16384
    with 128 x 128 blocks) against bfloat16's two."""
    out, none = tensors(dense["fp8"]), tensors(dense["none"])
    linear = [name for name in none if _linear(name)]
    bf16 = sum(none[name].numel() * none[name].element_size() for name in linear)
    fp8 = sum(out[n].numel() * out[n].element_size() for name in linear for n in (name, name + "_scale_inv"))
    assert fp8 == bf16 // 2 + bf16 // 2 // 16
    total = {name: sum(v.numel() * v.element_size() for v in tensors(dense[name]).values()) for name in dense}
    assert total["fp8"] < total["none"]


def test_none_is_the_default_and_unquantized(dense):
    none, default = tensors(dense["none"]), tensors(dense["default"])
    assert none.keys() == default.keys() and all(same_bytes(none[name], default[name]) for name in none)
    assert not any(v.dtype == torch.float8_e4m3fn for v in none.values())
    assert "quantization_config" not in json.loads((dense["none"] / "config.json").read_text())


def test_the_size_estimate_is_at_most_the_fp8_output(dense, calib_dir, tmp_path):
    estimates = {}
    for quantization in ("fp8", "none"):
        config = dense_config(dense["fp8"].parent / "moe", calib_dir, quantization)
        job = ConversionJob.prepare(config, str(tmp_path / quantization))
        estimates[quantization] = job.output.estimated_bytes(job)
    written = sum(v.numel() * v.element_size() for v in tensors(dense["fp8"]).values())
    assert estimates["fp8"] <= written < estimates["none"]


def test_a_block_size_without_fp8_is_refused(dense, calib_dir, tmp_path):
    config = dense_config(dense["fp8"].parent / "moe", calib_dir, None).model_copy(update={"output_block_size": BLOCK})
    with pytest.raises(ConfigError, match="output_block_size applies to output_quantization: fp8 only"):
        ConversionJob.prepare(config, str(tmp_path / "out"))
