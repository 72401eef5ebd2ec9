# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Shard headers that contradict config.json are refused when the source is opened, in one line."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from helpers import make_config, make_mixtral, write_config
from mergekit_moe2dense import build, job
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.cli import main
from mergekit_moe2dense.io import ShapeMismatchError
from mergekit_moe2dense.io.source import SourceModel
from tiny_families import make_family_moe

LEGACY = "model.layers.0.block_sparse_moe"
FUSED = "model.layers.0.mlp"
MIXTRAL_DIMS = r"\(num_local_experts: {e}, intermediate_size: {i}, hidden_size: {h}\)"


@pytest.fixture(scope="module")
def eight_experts(tmp_path_factory, tokenizer_dir):
    """A tiny Mixtral storing 8 experts of width 48, hidden size 32, in both layouts."""
    root = tmp_path_factory.mktemp("eight")
    return {
        layout: make_mixtral(root / layout, tokenizer_dir, layout=layout, num_local_experts=8)
        for layout in ("legacy", "fused")
    }


def edited_copy(source, path, config=None, tensors=None):
    """A copy of `source` with config.json values and safetensors tensors replaced."""
    shutil.copytree(source, path)
    if config:
        raw = json.loads((path / "config.json").read_text())
        raw.update(config)
        (path / "config.json").write_text(json.dumps(raw))
    if tensors:
        shard = os.fspath(path / "model.safetensors")
        state = load_file(shard)
        state.update({name: make(state[name]) for name, make in tensors.items()})
        save_file(state, shard, metadata={"format": "pt"})
    return path


# (layout, config edit, tensor edit, the message: tensor, shape found, shape implied)
CASES = {
    "4 declared, 8 stored, legacy": (
        "legacy",
        {"num_local_experts": 4},
        None,
        rf"^{LEGACY}\.experts\.4\.w1\.weight is in the checkpoint, but config\.json declares 4 experts "
        rf"{MIXTRAL_DIMS.format(e=4, i=48, h=32)}; layer 0 stores 8$",
    ),
    "4 declared, 8 stored, fused": (
        "fused",
        {"num_local_experts": 4},
        None,
        rf"^{FUSED}\.experts\.gate_up_proj has shape \[8, 96, 32\] in the checkpoint, config\.json implies "
        rf"\[4, 96, 32\] {MIXTRAL_DIMS.format(e=4, i=48, h=32)}$",
    ),
    "16 declared, 8 stored, legacy": (
        "legacy",
        {"num_local_experts": 16},
        None,
        rf"^{LEGACY}\.experts\.8\.w1\.weight is missing from the checkpoint: config\.json declares 16 experts "
        rf"{MIXTRAL_DIMS.format(e=16, i=48, h=32)}; layer 0 stores 8$",
    ),
    "16 declared, 8 stored, fused": (
        "fused",
        {"num_local_experts": 16},
        None,
        rf"^{FUSED}\.experts\.gate_up_proj has shape \[8, 96, 32\] in the checkpoint, config\.json implies \[16, 96, 32\]",
    ),
    "expert width, legacy": (
        "legacy",
        {"intermediate_size": 64},
        None,
        rf"^{LEGACY}\.experts\.0\.w1\.weight has shape \[48, 32\] in the checkpoint, config\.json implies \[64, 32\]",
    ),
    "expert width, fused": (
        "fused",
        {"intermediate_size": 64},
        None,
        rf"^{FUSED}\.experts\.gate_up_proj has shape \[8, 96, 32\] in the checkpoint, config\.json implies \[8, 128, 32\]",
    ),
    "one expert's down projection, legacy": (
        "legacy",
        None,
        {f"{LEGACY}.experts.5.w2.weight": lambda t: t[:, :40].contiguous()},
        rf"^{LEGACY}\.experts\.5\.w2\.weight has shape \[32, 40\] in the checkpoint, config\.json implies \[32, 48\]",
    ),
    "router rows, legacy": (
        "legacy",
        None,
        {"model.layers.1.block_sparse_moe.gate.weight": lambda t: t[:7].contiguous()},
        r"^model\.layers\.1\.block_sparse_moe\.gate\.weight has shape \[7, 32\] in the checkpoint, "
        r"config\.json implies \[8, 32\]",
    ),
    "router rows, fused": (
        "fused",
        None,
        {f"{FUSED}.gate.weight": lambda t: torch.cat([t, t[:1]]).contiguous()},
        rf"^{FUSED}\.gate\.weight has shape \[9, 32\] in the checkpoint, config\.json implies \[8, 32\]",
    ),
    "hidden size, fused": (
        "fused",
        {"hidden_size": 64},
        None,
        rf"^{FUSED}\.experts\.gate_up_proj has shape \[8, 96, 32\] in the checkpoint, config\.json implies \[8, 96, 64\]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_contradicting_headers_fail_when_the_source_is_opened(eight_experts, tmp_path, case):
    layout, config, tensors, message = CASES[case]
    moe = edited_copy(eight_experts[layout], tmp_path / "moe", config, tensors)
    with pytest.raises(ShapeMismatchError) as error:
        SourceModel.open(ModelReference.parse(str(moe)))
    assert re.search(message, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_the_unedited_checkpoints_open(eight_experts, layout):
    source = SourceModel.open(ModelReference.parse(str(eight_experts[layout])))
    assert [layer.num_experts for layer in source.moe_layers()] == [8, 8]


@pytest.mark.parametrize(
    "case", ["4 declared, 8 stored, legacy", "16 declared, 8 stored, fused", "router rows, legacy"]
)
def test_build_fails_before_calibration(eight_experts, calib_dir, tmp_path, monkeypatch, case):
    layout, config, tensors, message = CASES[case]
    moe = edited_copy(eight_experts[layout], tmp_path / "moe", config, tensors)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(build, "calibrate", no_calibration)
    monkeypatch.setattr(job, "load_calibration_batches", no_calibration)
    out = tmp_path / "dense"
    with pytest.raises(ShapeMismatchError, match=message):
        build_dense(make_config(moe, "router_weighted", calib_dir), str(out), MergeOptions(quiet=True))
    assert not out.exists()


def test_cli_reports_a_contradicting_header_in_one_line(eight_experts, calib_dir, tmp_path):
    moe = edited_copy(eight_experts["legacy"], tmp_path / "moe", {"num_local_experts": 4})
    out = tmp_path / "dense"
    config = write_config(tmp_path / "c.yml", moe, calib_dir)
    result = CliRunner().invoke(main, [str(config), str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "experts.4.w1.weight is in the checkpoint" in lines[0], result.output
    assert not out.exists() and not list(tmp_path.glob("dense.incomplete-*"))


@pytest.mark.parametrize(
    "family,edit,message",
    [
        # the shared expert's width
        (
            "qwen2_moe",
            {"shared_expert_intermediate_size": 20},
            r"^model\.layers\.1\.mlp\.shared_expert\.gate_proj\.weight has shape \[16, 32\] in the checkpoint, "
            r"config\.json implies \[20, 32\] \(num_experts: 4, moe_intermediate_size: 24, hidden_size: 32, "
            r"shared_expert_intermediate_size: 20\)$",
        ),
        # DeepSeek's n shared experts are one MLP n times as wide
        (
            "deepseek_v2",
            {"n_shared_experts": 3},
            r"^model\.layers\.1\.mlp\.shared_experts\.gate_proj\.weight has shape \[32, 32\] in the checkpoint, "
            r"config\.json implies \[48, 32\]",
        ),
        # the router's correction bias [E] (fused layout)
        (
            "deepseek_v3",
            {"n_routed_experts": 3, "n_group": 1},
            r"^model\.layers\.1\.mlp\.experts\.gate_up_proj has shape \[4, 32, 32\] in the checkpoint, "
            r"config\.json implies \[3, 32, 32\]",
        ),
        # a layer that is dense already (mlp_only_layers: [0]) is padded to the dense width
        (
            "qwen3_moe",
            {"intermediate_size": 44},
            r"^model\.layers\.0\.mlp\.gate_proj\.weight has shape \[40, 32\] in the checkpoint, config\.json "
            r"implies \[44, 32\] \(intermediate_size: 44, hidden_size: 32\)$",
        ),
    ],
)
def test_other_families_check_their_own_tensors(tokenizer_dir, tmp_path, family, edit, message):
    layout = "fused" if family == "deepseek_v3" else "legacy"
    made = make_family_moe(family, tmp_path / "made", tokenizer_dir, layout=layout)
    SourceModel.open(ModelReference.parse(str(made)))  # as saved: consistent
    moe = edited_copy(made, tmp_path / "moe", edit)
    with pytest.raises(ShapeMismatchError) as error:
        SourceModel.open(ModelReference.parse(str(moe)))
    assert re.search(message, str(error.value)), str(error.value)


def test_router_bias_shape_is_checked(tokenizer_dir, tmp_path):
    made = make_family_moe("deepseek_v3", tmp_path / "made", tokenizer_dir, layout="fused")
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    moe = edited_copy(made, tmp_path / "moe", tensors={bias: lambda t: t[:3].contiguous()})
    with pytest.raises(
        ShapeMismatchError, match=rf"^{re.escape(bias)} has shape \[3\] in the checkpoint, config\.json implies \[4\]"
    ):
        SourceModel.open(ModelReference.parse(str(moe)))
