# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reused router statistics (`--stats`) are accepted only on the very weights they were recorded on:
the routers, the experts and everything upstream of them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, make_config, run_cli, write_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import RouterStatistics
from mergekit_moe2dense.outputs.base import STATS_FILE
from mergekit_moe2dense.statistics import StatisticsError

OPTIONS = MergeOptions(quiet=True)


@pytest.fixture(scope="module")
def calibrated(random_moe, calib_dir, tmp_path_factory):
    """A smaller MoE of the random Mixtral (2 of 4 experts by REAP) and the statistics it recorded."""
    out = tmp_path_factory.mktemp("calibrated") / "pruned"
    build_dense(make_config(random_moe["legacy"], "prune_experts", calib_dir, num_experts=2), str(out), OPTIONS)
    return out


def copy_with(moe, path, edit=None):
    """A copy of `moe` whose tensors `edit(name, tensor)` replaces (None: kept)."""
    shutil.copytree(moe, path)
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    if edit is not None:
        tensors = {name: edited if (edited := edit(name, t)) is not None else t for name, t in tensors.items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    return path


def experts_redrawn(name, tensor):
    """The experts drawn again, the routers and every other tensor kept."""
    return torch.randn_like(tensor) * tensor.std() if ".experts." in name else None


def test_statistics_are_reused_on_a_copy_of_their_model(random_moe, calib_dir, calibrated, tmp_path):
    moe = copy_with(random_moe["legacy"], tmp_path / "copy")  # another path, the tensors rewritten
    config = make_config(moe, "prune_experts", calib_dir, num_experts=2)
    build_dense(config, str(tmp_path / "again"), OPTIONS, stats_path=str(calibrated / STATS_FILE))
    groups = [
        json.loads((out / "expert_weights.json").read_text())["groups"] for out in (calibrated, tmp_path / "again")
    ]
    assert groups[0] == groups[1]


@pytest.mark.parametrize(
    "edit",
    [
        experts_redrawn,
        lambda name, t: t.flip(0) if name == "model.embed_tokens.weight" else None,
        lambda name, t: t * 2 if name.endswith("self_attn.v_proj.weight") else None,
    ],
    ids=["experts", "embeddings", "attention"],
)
def test_statistics_of_the_same_routers_with_other_weights_are_refused(
    random_moe, calib_dir, calibrated, tmp_path, edit
):
    """The routers alone match, so a router-only fingerprint accepts these statistics, and the
    experts kept would be chosen by other weights' routing and contributions."""
    moe = copy_with(random_moe["legacy"], tmp_path / "other", edit)
    config = write_config(tmp_path / "c.yml", moe, calib_dir, method="prune_experts", num_experts=2)
    result = run_cli(config, tmp_path / "out", "--stats", calibrated)
    assert_one_line_error(
        result, r"not on this model \(the same architecture, but its experts or other weights differ\)"
    )
    assert not (tmp_path / "out").exists()


def recorded(calibrated, tmp_path, **changes):
    """The calibrated statistics with their recorded fingerprint changed."""
    stats = RouterStatistics.load(calibrated / STATS_FILE)
    stats.metadata["model_fingerprint"] = {**stats.metadata["model_fingerprint"], **changes}
    stats.metadata["model_fingerprint"] = {
        k: v for k, v in stats.metadata["model_fingerprint"].items() if v is not None
    }
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"content_sha256": None, "router_sha256": "0" * 64},
            r"written by an older version, which identified the model by its routers alone.*recalibrate without --stats",
        ),
        ({"model_type": "qwen3_moe"}, r"another model type: qwen3_moe, not mixtral"),
        ({"num_experts": 8}, r"MoE layers \[0, 1\] with 8 experts, not \[0, 1\] with 4"),
    ],
    ids=["older-version", "model-type", "expert-count"],
)
def test_a_refusal_says_what_differs(random_moe, calib_dir, calibrated, tmp_path, changes, message):
    stats = recorded(calibrated, tmp_path, **changes)
    config = make_config(random_moe["legacy"], "prune_experts", calib_dir, num_experts=2)
    with pytest.raises(StatisticsError, match=message):
        build_dense(config, str(tmp_path / "out"), OPTIONS, stats_path=str(stats))
