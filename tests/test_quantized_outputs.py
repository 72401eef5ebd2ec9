# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Smaller MoEs of quantized sources written in the source's format (`output_quantization: source`):
kept experts and every other quantized tensor copied bit for bit, merged or re-fitted experts
quantized in the same format within its error, loadable by transformers, about the source's size;
`output_quantization: none` is the dequantized output as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from helpers import (
    FP4_VALUES,
    assert_one_line_error,
    expand_blocks,
    logits_of,
    make_config,
    quantize_fp8_checkpoint,
    quantize_mxfp4_checkpoint,
    run_cli,
    save_dequantized,
    write_config,
)
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.io.quantize import fp8_block_quantize, mxfp4_quantize
from mergekit_moe2dense.job import ConversionJob
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
# whole blocks of every tiny qwen3_moe tensor (hidden 32, experts 24, dense MLP 40, heads 8): transformers
# dequantizes FP8 on a CPU only where the blocks divide the weight
BLOCK = (8, 8)
# the logits of a quantized output, which transformers dequantizes on load, against the dequantized
# output's: equal weights give the same logits up to the order of float32 sums
SAME_WEIGHTS_ATOL = 1e-5


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def convert(source, out: Path, method: str, calib_dir, quantization: str | None, **params) -> Path:
    config = make_config(source, method, calib_dir, num_experts=2, **params)
    build_dense(config.model_copy(update={"output_quantization": quantization}), str(out), OPTIONS)
    return out


def groups_of(out: Path) -> list[list[list[int]]]:
    return json.loads((out / "expert_weights.json").read_text())["groups"]


def expert_bytes(path: Path) -> int:
    """Bytes of the routed experts' tensors (weights and scales) in a checkpoint."""
    return sum(v.numel() * v.element_size() for name, v in tensors(path).items() if ".mlp.experts." in name)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# -- the quantizers, against transformers' own code --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64), (3, 32, 16)])
def test_fp8_quantizer_is_transformers_on_whole_blocks(shape):
    """Bit for bit transformers' `Fp8Quantize` (the reverse of its FP8 loading), where that applies."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    weight[..., :16, :16] = 0  # an all-zero block: scale 1
    config = transformers.FineGrainedFP8Config(weight_block_size=[16, 16])
    reference = Fp8Quantize(type("Quantizer", (), {"quantization_config": config})())._quantize_one("w.weight", weight)
    data, scales = fp8_block_quantize(weight, (16, 16))
    assert same_bytes(data, reference["w.weight"]) and same_bytes(scales, reference["w.weight_scale_inv"])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu])
def test_fp8_quantizer_round_trips_partial_blocks_within_the_format_error(scale_dtype):
    """Partial last blocks (40 = 16 + 16 + 8 rows): transformers' dequantization gives back every value
    within e4m3's error, 2**-4 relative plus the subnormal spacing's half, 2**-10 of the block scale."""
    weight = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(2))
    data, scales = fp8_block_quantize(weight, (16, 16), scale_dtype)
    assert data.shape == weight.shape and scales.shape == (2, 3, 2) and scales.dtype == scale_dtype
    value = _dequantize_fp8_weight(data, scales, [16, 16], torch.float32)
    scale = expand_blocks(scales.float(), weight.shape, (16, 16))
    assert bool(((value - weight).abs() <= weight.abs() * 2**-4 + scale * 2**-10).all())


def test_fp8_quantizer_ue8m0_scales_are_powers_of_two():
    weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    data, scales = fp8_block_quantize(weight, (16, 16), power_of_two=True)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    value = _dequantize_fp8_weight(data, scales, [16, 16], torch.float32)
    assert bool(
        ((value - weight).abs() <= weight.abs() * 2**-4 + expand_blocks(scales, weight.shape, (16, 16)) * 2**-10).all()
    )


def test_mxfp4_quantizer_is_inverted_by_transformers():
    """Values on the E2M1 grid of a group's scale, the largest at 6 x scale, come back exactly; any
    value within the scale 2**e (its e8m0 byte - 127) of itself."""
    generator = torch.Generator().manual_seed(4)
    grid = FP4_VALUES[torch.randint(0, 16, (3, 40, 2, 32), generator=generator)]  # [E, out, groups, 32]
    grid[..., 0] = 6.0  # each group's largest magnitude
    exponents = torch.randint(-8, 4, (3, 40, 2, 1), generator=generator).float()
    exact = (grid * torch.exp2(exponents)).flatten(-2).transpose(1, 2)  # [E, in, out]
    blocks, scales = mxfp4_quantize(exact)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2) and blocks.dtype == scales.dtype == torch.uint8
    assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), exact)
    weight = torch.randn(3, 64, 40, generator=generator) * torch.logspace(-3, 1, 40)
    blocks, scales = mxfp4_quantize(weight)
    value = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    bound = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
    assert bool(((value - weight).abs() <= bound).all())
    assert bool(((value - weight).abs() <= weight.abs().amax(1, keepdim=True) / 3).all())  # 2**e < amax / 3


# -- block-wise FP8 sources (Qwen3 FP8, DeepSeek-V3) -------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, tokenizer_dir, calib_dir):
    """A random tiny qwen3_moe in block-wise FP8, its exactly dequantized copy, and their smaller MoEs
    (2 of 4 experts): by name, the output directory."""
    root = tmp_path_factory.mktemp("fp8-outputs")
    moe = make_family_moe("qwen3_moe", root / "moe", tokenizer_dir)
    source, reference = quantize_fp8_checkpoint(moe, root / "fp8", BLOCK)
    dequantized = save_dequantized(moe, root / "deq", reference)
    outputs = {"source": source, "dequantized": dequantized}
    for name, method, quantization, params in (
        ("pruned", "prune_experts", "source", {"refit": "none"}),
        ("pruned-none", "prune_experts", "none", {"refit": "none"}),
        ("pruned-deq", "prune_experts", None, {"refit": "none"}),
        ("refit", "prune_experts", None, {"refit": "down_proj"}),
        ("refit-none", "prune_experts", "none", {"refit": "down_proj"}),
        ("merged", "merge_experts", None, {}),
        ("merged-none", "merge_experts", "none", {}),
    ):
        model = dequantized if name.endswith("-deq") else source
        outputs[name] = convert(model, root / name, method, calib_dir, quantization, **params)
    return outputs


def test_pruned_fp8_copies_the_kept_experts_and_every_fp8_tensor_bit_for_bit(fp8):
    source, out = tensors(fp8["source"]), tensors(fp8["pruned"])
    kept = groups_of(fp8["pruned"])
    checked = 0
    for name, value in out.items():
        if ".mlp.experts." in name:  # model.layers.{l}.mlp.experts.{j}.{proj}.weight[_scale_inv]
            layer, expert = int(name.split(".")[2]), int(name.split(".")[5])
            position = [1, 2].index(layer)  # layer 0 is dense
            old = name.replace(f"experts.{expert}.", f"experts.{kept[position][expert][0]}.")
            assert same_bytes(value, source[old]), name
            checked += 1
        elif name in source and source[name].dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            assert same_bytes(value, source[name]), name  # attention and the dense MLP, with their scales
    assert checked == 2 * 2 * 3 * 2  # layers x experts x projections x (weight, scale)
    assert {n for n in out if n.endswith("_scale_inv")} == {
        n + "_scale_inv" for n, v in out.items() if v.dtype == torch.float8_e4m3fn
    }
    assert not any(value.dtype == torch.float8_e4m3fn for name, value in out.items() if "mlp.gate." in name)  # router
    written = json.loads((fp8["pruned"] / "config.json").read_text())
    assert (
        written["quantization_config"] == json.loads((fp8["source"] / "config.json").read_text())["quantization_config"]
    )
    assert transformers.AutoConfig.from_pretrained(fp8["pruned"]).num_experts == 2


def test_pruned_fp8_loads_in_transformers_with_the_dequantized_outputs_logits(fp8):
    """transformers dequantizes FP8 on a CPU (`dequantize`, its warning says): the same weights as the
    dequantized output's, hence its logits."""
    torch.testing.assert_close(
        logits_of(fp8["pruned"], IDS), logits_of(fp8["pruned-none"], IDS), rtol=0, atol=SAME_WEIGHTS_ATOL
    )


def test_output_quantization_none_is_the_dequantized_sources_output(fp8):
    """`none`: every tensor dequantized, no quantization_config: exactly what the exactly dequantized
    checkpoint converts to (what every output of an FP8 source was before)."""
    none, before = tensors(fp8["pruned-none"]), tensors(fp8["pruned-deq"])
    assert none.keys() == before.keys() and not any(name.endswith("_scale_inv") for name in none)
    for name, value in none.items():
        assert same_bytes(value, before[name]), name
    assert "quantization_config" not in json.loads((fp8["pruned-none"] / "config.json").read_text())


def _assert_fp8_within_error(quantized: dict, reference: dict, name: str) -> None:
    """An FP8 weight and its scales dequantize to the float output's tensor within e4m3's error."""
    data, scales, exact = quantized[name], quantized[name + "_scale_inv"], reference[name]
    value = _dequantize_fp8_weight(data, scales, list(BLOCK), torch.float32)
    bound = exact.abs() * 2**-4 + expand_blocks(scales, exact.shape, BLOCK) * 2**-10
    assert bool(((value - exact).abs() <= bound).all()), name


def test_refitted_down_projections_are_quantized_and_gate_up_copied(fp8):
    """`refit: down_proj`: each kept expert's gate and up are the source's bytes, its fitted down the
    dequantized output's within the format's error."""
    source, out, none = tensors(fp8["source"]), tensors(fp8["refit"]), tensors(fp8["refit-none"])
    kept = groups_of(fp8["refit"])
    downs = [name for name in out if name.endswith("down_proj.weight") and ".experts." in name]
    assert len(downs) == 4
    for name in downs:
        assert out[name].dtype == torch.float8_e4m3fn
        _assert_fp8_within_error(out, none, name)
        layer, expert = int(name.split(".")[2]), int(name.split(".")[5])
        old = kept[[1, 2].index(layer)][expert][0]
        for projection in ("gate_proj", "up_proj"):
            mine = name.replace("down_proj", projection)
            assert same_bytes(out[mine], source[mine.replace(f"experts.{expert}.", f"experts.{old}.")])
    assert (logits_of(fp8["refit"], IDS) - logits_of(fp8["refit-none"], IDS)).abs().max() < 0.05


def test_merged_experts_are_quantized_within_the_format_error(fp8):
    out, none = tensors(fp8["merged"]), tensors(fp8["merged-none"])
    experts = [name for name in none if ".experts." in name]
    assert experts and all(out[name].dtype == torch.float8_e4m3fn for name in experts)
    for name in experts:
        _assert_fp8_within_error(out, none, name)
    assert (logits_of(fp8["merged"], IDS) - logits_of(fp8["merged-none"], IDS)).abs().max() < 0.05


def test_a_k_expert_moe_of_fp8_is_fp8(fp8, calib_dir, tmp_path):
    """`kmeans_multi_dense` with `output: moe`: every expert a merge, each quantized."""
    config = make_config(fp8["source"], "kmeans_multi_dense", calib_dir, num_clusters=2, output="moe")
    outs = {}
    for quantization in ("source", "none"):
        outs[quantization] = tmp_path / quantization
        build_dense(config.model_copy(update={"output_quantization": quantization}), str(outs[quantization]), OPTIONS)
    out, none = tensors(outs["source"]), tensors(outs["none"])
    experts = [name for name in none if ".experts." in name]
    assert len(experts) == 2 * 2 * 3
    for name in experts:
        _assert_fp8_within_error(out, none, name)
    assert "quantization_config" in json.loads((outs["source"] / "config.json").read_text())


def test_static_activation_scales_are_written_dequantized_by_default(fp8, calib_dir, tmp_path):
    """FP8 with static activation scales: merged experts would have none, so `source` is refused and
    the default writes the smaller MoE dequantized."""
    static = tmp_path / "static"
    static.mkdir()
    for item in fp8["source"].iterdir():
        (static / item.name).write_bytes(item.read_bytes())
    raw = json.loads((static / "config.json").read_text())
    raw["quantization_config"]["activation_scheme"] = "static"
    (static / "config.json").write_text(json.dumps(raw))
    config = make_config(static, "prune_experts", calib_dir, num_experts=2)
    assert ConversionJob.prepare(config, str(tmp_path / "default")).quantization == "none"
    with pytest.raises(ConfigError, match="static activation scales") as error:
        ConversionJob.prepare(config.model_copy(update={"output_quantization": "source"}), str(tmp_path / "source"))
    assert "\n" not in str(error.value)


def test_pruning_half_the_experts_of_fp8_keeps_half_their_bytes(fp8):
    """Experts: half the source's bytes (FP8 and scales), not twice; the whole checkpoint smaller than
    the source's; the dequantized output's experts 4 bytes a value (float32 config)."""
    source, pruned, none = (expert_bytes(fp8[name]) for name in ("source", "pruned", "pruned-none"))
    assert 2 * pruned == source
    assert none > 3 * pruned
    sizes = {name: sum(v.numel() * v.element_size() for v in tensors(fp8[name]).values()) for name in fp8}
    assert sizes["pruned"] < sizes["source"] < sizes["pruned-none"]


def test_the_size_estimate_counts_quantized_tensors_as_stored(fp8, calib_dir, tmp_path):
    config = make_config(fp8["source"], "prune_experts", calib_dir, num_experts=2)
    estimates = {}
    for quantization in ("source", "none"):
        job = ConversionJob.prepare(
            config.model_copy(update={"output_quantization": quantization}), str(tmp_path / quantization)
        )
        estimates[quantization] = job.output.estimated_bytes(job)
    written = sum(v.numel() * v.element_size() for v in tensors(fp8["pruned"]).values())
    assert estimates["source"] <= written < estimates["none"]


def test_output_quantization_source_is_refused_for_a_dense_output(fp8, calib_dir, tmp_path):
    config = make_config(fp8["source"], "router_weighted", calib_dir).model_copy(
        update={"output_quantization": "source"}
    )
    with pytest.raises(ConfigError, match="output_quantization: source .* MoE outputs only") as error:
        build_dense(config, str(tmp_path / "dense"), OPTIONS)
    assert "\n" not in str(error.value)
    written = write_config(tmp_path / "c.yml", fp8["source"], calib_dir)
    result = run_cli("merge", written, tmp_path / "cli", "--output-quantization", "source")
    assert_one_line_error(result, "MoE outputs only")


def test_the_command_line_flag_overrides_the_config(fp8, calib_dir, tmp_path):
    written = write_config(tmp_path / "c.yml", fp8["source"], calib_dir, "prune_experts", num_experts=2, refit="none")
    out = tmp_path / "out"
    result = run_cli("merge", written, out, "--output-quantization", "none", "--quiet")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_fused_fp8_experts_are_copied_where_their_rows_are_whole_blocks(tokenizer_dir, calib_dir, tmp_path):
    """A fused [E, 2I, H] FP8 source: each kept expert's gate and up rows, and their scale rows, copied
    where I is a multiple of the block (24 of 8); requantized from the dequantized rows where not (of 16)."""
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir, layout="fused")
    for block, copied in ((BLOCK, True), ((16, 16), False)):
        source, _ = quantize_fp8_checkpoint(moe, tmp_path / f"fp8-{block[0]}", block)
        out = convert(source, tmp_path / f"out-{block[0]}", "prune_experts", calib_dir, None, refit="none")
        stored, written, kept = tensors(source), tensors(out), groups_of(out)
        for layer in (1, 2):
            old = kept[layer - 1][0][0]
            fused, scales = (
                stored[f"model.layers.{layer}.mlp.experts.gate_up_proj{s}"][old] for s in ("", "_scale_inv")
            )
            gate = f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"
            assert written[gate].dtype == torch.float8_e4m3fn
            assert same_bytes(written[gate], fused[:24].contiguous()) == copied
            if copied:
                assert same_bytes(written[gate + "_scale_inv"], scales[:3].contiguous())
            else:  # the dequantized rows, quantized again: within the format's error of them
                exact = _dequantize_fp8_weight(fused, scales, list(block), torch.float32)[:24]
                value = _dequantize_fp8_weight(written[gate], written[gate + "_scale_inv"], list(block), torch.float32)
                assert bool(
                    ((value - exact).abs() <= exact.abs() * 2**-4 + 2**-10 * written[gate + "_scale_inv"].max()).all()
                )


def test_deepseek_v3_fp8_keeps_shared_experts_and_drops_the_mtp_layer(tokenizer_dir, calib_dir, tmp_path):
    """DeepSeek-V3 as released: FP8 with a multi-token-prediction layer. The pruned MoE's shared experts
    and MLA projections are the source's bytes; the MTP layer is left out and the config says so."""
    moe = make_family_moe("deepseek_v3", tmp_path / "moe", tokenizer_dir)
    shard, config = moe / "model.safetensors", json.loads((moe / "config.json").read_text())
    state, last = load_file(str(shard)), config["num_hidden_layers"] - 1
    mtp = {
        name.replace(f"layers.{last}.", f"layers.{last + 1}."): t.clone()
        for name, t in state.items()
        if f"layers.{last}." in name
    }
    save_file(state | mtp, str(shard), metadata={"format": "pt"})
    (moe / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    source, _ = quantize_fp8_checkpoint(moe, tmp_path / "fp8", (4, 4))
    out = convert(source, tmp_path / "pruned", "prune_experts", calib_dir, None, refit="none")
    none = convert(source, tmp_path / "pruned-none", "prune_experts", calib_dir, "none", refit="none")
    stored, written = tensors(source), tensors(out)
    shared = [name for name in written if "shared_experts" in name or "self_attn.q_a_proj" in name]
    assert any(name.endswith("_scale_inv") for name in shared)
    for name in shared:
        assert same_bytes(written[name], stored[name]), name
    assert not any(f"layers.{last + 1}." in name for name in written)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    torch.testing.assert_close(logits_of(out, IDS), logits_of(none, IDS), rtol=0, atol=SAME_WEIGHTS_ATOL)


# -- MXFP4 sources (GPT-OSS) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory, tokenizer_dir, calib_dir):
    """A random tiny GPT-OSS with MXFP4 experts, and its smaller MoEs (2 of 4 experts)."""
    root = tmp_path_factory.mktemp("mxfp4-outputs")
    moe = make_family_moe("gpt_oss", root / "moe", tokenizer_dir)
    source, _ = quantize_mxfp4_checkpoint(moe, root / "mxfp4")
    outputs = {"source": source}
    for name, method, quantization, params in (
        ("pruned", "prune_experts", None, {"refit": "none"}),
        ("pruned-none", "prune_experts", "none", {"refit": "none"}),
        ("merged", "merge_experts", "source", {}),
        ("merged-none", "merge_experts", "none", {}),
    ):
        outputs[name] = convert(source, root / name, method, calib_dir, quantization, **params)
    return outputs


PROJECTIONS = ("gate_up_proj", "down_proj")


def test_pruned_mxfp4_selects_the_kept_experts_blocks_and_scales(mxfp4):
    source, out = tensors(mxfp4["source"]), tensors(mxfp4["pruned"])
    kept = groups_of(mxfp4["pruned"])
    for layer in range(3):
        index = torch.tensor([group[0] for group in kept[layer]])
        prefix = f"model.layers.{layer}.mlp.experts."
        for name in [prefix + p + s for p in PROJECTIONS for s in ("_blocks", "_scales")]:
            assert same_bytes(out[name], source[name][index].contiguous()), name
        for name in [prefix + p + "_bias" for p in PROJECTIONS]:
            assert torch.equal(out[name], source[name][index]), name  # float: as every output copies it
    written = json.loads((mxfp4["pruned"] / "config.json").read_text())
    assert (
        written["quantization_config"]
        == json.loads((mxfp4["source"] / "config.json").read_text())["quantization_config"]
    )
    assert transformers.AutoConfig.from_pretrained(mxfp4["pruned"]).num_local_experts == 2
    torch.testing.assert_close(
        logits_of(mxfp4["pruned"], IDS), logits_of(mxfp4["pruned-none"], IDS), rtol=0, atol=SAME_WEIGHTS_ATOL
    )


def test_merged_mxfp4_experts_are_quantized_within_the_format_error(mxfp4):
    out, none = tensors(mxfp4["merged"]), tensors(mxfp4["merged-none"])
    for layer in range(3):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.mlp.experts.{projection}"
            blocks, scales, exact = out[name + "_blocks"], out[name + "_scales"], none[name]
            value = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            bound = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)  # 2**e per group
            assert bool(((value - exact).abs() <= bound).all()), name
    assert (logits_of(mxfp4["merged"], IDS) - logits_of(mxfp4["merged-none"], IDS)).abs().max() < 0.5


def test_pruning_half_the_experts_of_mxfp4_keeps_half_their_bytes(mxfp4):
    source, pruned = expert_bytes(mxfp4["source"]), expert_bytes(mxfp4["pruned"])
    assert 2 * pruned == source
