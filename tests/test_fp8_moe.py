# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Smaller MoEs in block-wise FP8 (`output_quantization: fp8`) from any source: every routed
expert's projections, the shared experts and attention in float8_e4m3fn with a scale per block,
within the format's error of the `none` output's tensors; routers, their extra tensors, norms,
embeddings and lm_head as `none` writes them; transformers reads every scale back (the loaded
model's logits are those of the output dequantized by hand). Families whose smaller MoEs are
written with fused experts are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from helpers import assert_one_line_error, expand_blocks, logits_of, make_config, run_cli, write_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import get_family
from mergekit_moe2dense.families.spec import FusedLayout
from mergekit_moe2dense.job import ConversionJob
from tiny_families import FAMILY_SPECS, make_family_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
BLOCK = (2, 2)  # divides every weight of the tiny families: transformers dequantizes whole blocks only
# what transformers' dequantize-on-load may differ from ours by (float32 arithmetic)
READ_BACK_ATOL = 1e-4


def family_of(name: str):
    return get_family(FAMILY_SPECS[name][0]())


PER_EXPERT = sorted(f for f in FAMILY_SPECS if not isinstance(family_of(f).moe_layout(), FusedLayout))
FUSED = sorted(set(FAMILY_SPECS) - set(PER_EXPERT))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


SMALLER = {"prune_experts": {"num_experts": 2}, "merge_experts": {"num_experts": 2}}
K_EXPERTS = {"num_clusters": 2, "output": "moe"}  # kmeans_multi_dense's MoE


def fp8_config(moe: Path, calib_dir, quantization: str, method: str = "prune_experts", **params):
    params = params or SMALLER[method]
    return make_config(moe, method, calib_dir, **params).model_copy(
        update={"output_quantization": quantization, "output_block_size": BLOCK if quantization == "fp8" else None}
    )


def convert(moe: Path, out: Path, calib_dir, quantization: str, method: str = "prune_experts", **params) -> Path:
    build_dense(fp8_config(moe, calib_dir, quantization, method, **params), str(out), OPTIONS)
    return out


def dequantized_by_hand(out: Path, dest: Path) -> Path:
    """`out` with each FP8 weight replaced by data x scale per block, and no quantization_config."""
    written, plain = tensors(out), {}
    for name, value in written.items():
        if name.endswith("_scale_inv"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = _dequantize_fp8_weight(value, written[name + "_scale_inv"], list(BLOCK), torch.float32)
        plain[name] = value
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(plain, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    del config["quantization_config"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def expected_fp8(spec, none: dict[str, torch.Tensor]) -> set[str]:
    """The matrices of the decoder layers but the routers and their extra tensors (a shared-expert gate)."""
    layout = spec.moe_layout()
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in none if ".layers." in name}
    routers = {spec.moe_router_name(layer) for layer in layers}
    extras = {layout.extra(template, layer) for template in spec.extra_tensors for layer in layers}
    return {
        name
        for name, value in none.items()
        if ".layers." in name
        and name.endswith(".weight")
        and value.dim() == 2
        and "norm" not in name
        and name not in routers | extras
    }


def check_fp8_output(moe: Path, spec, tmp_path: Path, calib_dir, method: str = "prune_experts", **params) -> None:
    fp8 = convert(moe, tmp_path / "fp8", calib_dir, "fp8", method, **params)
    none = convert(moe, tmp_path / "none", calib_dir, "none", method, **params)
    out, exact = tensors(fp8), tensors(none)
    quantized = {name for name, value in out.items() if value.dtype == torch.float8_e4m3fn}
    assert quantized == expected_fp8(spec, exact)
    assert any(".experts." in name for name in quantized) and any("attn" in name for name in quantized)
    assert set(out) == set(exact) | {name + "_scale_inv" for name in quantized}
    for name in quantized:
        scales, reference = out[name + "_scale_inv"], exact[name].float()
        value = _dequantize_fp8_weight(out[name], scales, list(BLOCK), torch.float32)
        bound = reference.abs() * 2**-4 + expand_blocks(scales, reference.shape, BLOCK) * 2**-10
        assert bool(((value - reference).abs() <= bound).all()), name
    for name in set(exact) - quantized:
        assert same_bytes(out[name], exact[name]), name
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == list(BLOCK)
    assert "lm_head" in config["quantization_config"]["modules_to_not_convert"]
    by_hand = dequantized_by_hand(fp8, tmp_path / "by-hand")
    logits = logits_of(fp8, IDS)
    assert torch.allclose(logits, logits_of(by_hand, IDS), atol=READ_BACK_ATOL)
    assert (logits - logits_of(none, IDS)).abs().max() > 0


@pytest.mark.parametrize("family", PER_EXPERT)
def test_a_pruned_moe_in_fp8_is_read_back_by_transformers(family, tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir)
    check_fp8_output(moe, family_of(family), tmp_path, calib_dir)


def test_a_pruned_mixtral_in_fp8_is_read_back_by_transformers(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    spec = get_family(transformers.AutoConfig.from_pretrained(moe))
    check_fp8_output(moe, spec, tmp_path, calib_dir)


def test_merged_experts_in_fp8_are_read_back(tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir)
    check_fp8_output(moe, family_of("qwen3_moe"), tmp_path, calib_dir, method="merge_experts")


def test_a_k_expert_moe_in_fp8_is_read_back(tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir)
    check_fp8_output(moe, family_of("qwen3_moe"), tmp_path, calib_dir, "kmeans_multi_dense", **K_EXPERTS)


def test_the_size_estimate_is_at_most_the_fp8_output(tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir)
    estimates = {}
    for quantization in ("fp8", "none"):
        job = ConversionJob.prepare(fp8_config(moe, calib_dir, quantization), str(tmp_path / quantization))
        estimates[quantization] = job.output.estimated_bytes(job)
    written = sum(
        v.numel() * v.element_size() for v in tensors(convert(moe, tmp_path / "out", calib_dir, "fp8")).values()
    )
    assert estimates["fp8"] <= written < estimates["none"]


def test_fp8_halves_the_experts_bytes(tokenizer_dir, calib_dir, tmp_path):
    """A byte a value plus a float32 scale per 2 x 2 block (1 + 1 = 2 bytes a value here, 1 + 4 / 16384
    with 128 x 128 blocks) against float32's four."""
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir)
    out = tensors(convert(moe, tmp_path / "fp8", calib_dir, "fp8"))
    exact = tensors(convert(moe, tmp_path / "none", calib_dir, "none"))
    experts = [name for name in exact if ".experts." in name]
    assert all(exact[name].dtype == torch.float32 for name in experts)
    stored = sum(out[n].numel() * out[n].element_size() for name in experts for n in (name, name + "_scale_inv"))
    assert stored * 2 == sum(exact[name].numel() * exact[name].element_size() for name in experts)


@pytest.mark.parametrize("family", FUSED)
def test_fp8_is_refused_where_the_experts_are_written_fused(family, tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir)
    config = make_config(moe, "prune_experts", calib_dir, num_experts=2).model_copy(
        update={"output_quantization": "fp8"}
    )
    with pytest.raises(ConfigError, match="writes its experts fused") as error:
        ConversionJob.prepare(config, str(tmp_path / "pruned"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pruned").exists()


def test_the_command_line_flag_writes_fp8(tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe("qwen3_moe", tmp_path / "moe", tokenizer_dir)
    written = write_config(tmp_path / "c.yml", moe, calib_dir, "prune_experts", num_experts=2, refit="none")
    dry = run_cli("merge", written, tmp_path / "out", "--output-quantization", "fp8", "--dry-run")
    assert "experts per layer (Qwen3MoeForCausalLM) in block FP8 (128 x 128 blocks)" in dry.output, dry.output
    assert not (tmp_path / "out").exists()
    result = run_cli("merge", written, tmp_path / "out", "--output-quantization", "fp8")
    assert result.exit_code == 0, result.output
    assert "in block FP8 (128 x 128 blocks)" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    gpt_oss = make_family_moe("gpt_oss", tmp_path / "gpt-oss", tokenizer_dir)
    written = write_config(tmp_path / "g.yml", gpt_oss, calib_dir, "prune_experts", num_experts=2, refit="none")
    assert_one_line_error(run_cli("merge", written, tmp_path / "g", "--output-quantization", "fp8"), "fused")
