# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card: a Hub base model only when the source is a Hub id; the method, its
parameters, the calibration data and the figures measured while converting."""

from __future__ import annotations

import re

from mergekit.options import MergeOptions

from helpers import make_config
from mergekit_moe2dense.build import STATS_FILE, build_dense
from mergekit_moe2dense.calibration import RouterStatistics
from mergekit_moe2dense.card import _write_card
from mergekit_moe2dense.config import Moe2DenseConfig


def _card(tmp_path, model: str) -> str:
    config = Moe2DenseConfig.model_validate({"merge_method": "expert_uniform", "models": [{"model": model}]})
    _write_card(str(tmp_path), config, "merge", "body", None)
    return (tmp_path / "README.md").read_text()


def test_local_source_has_no_base_model(tmp_path):
    source = tmp_path / "moe"
    source.mkdir()
    card = _card(tmp_path, str(source))
    assert "base_model" not in card and "# " in card


def test_hub_source_is_the_base_model(tmp_path):
    card = _card(tmp_path, "mistralai/Mixtral-8x7B-v0.1")
    assert "base_model: mistralai/Mixtral-8x7B-v0.1\n---" in card
    assert "github.com/arcee-ai/mergekit-moe2dense" not in card


def test_card_lists_method_parameters_calibration_and_refit_errors(random_moe, calib_dir, tmp_path):
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir, temperature=0.7, refit="down_proj")
    build_dense(config, str(tmp_path / "fit"), MergeOptions(quiet=True))
    card = (tmp_path / "fit" / "README.md").read_text()
    assert "## Method\n\n`router_weighted`" in card
    assert "| `temperature` | `0.7` |" in card and "| `refit` | `down_proj` |" in card
    stats = RouterStatistics.load(tmp_path / "fit" / STATS_FILE)
    assert "computed in this run" in card
    assert f"| `{calib_dir}` | 8 | 32 | {stats.tokens} |" in card
    rows = re.findall(r"^\| (\d+) \| ([\d.e-]+) \| ([\d.e-]+) \|$", card.split("### Re-fit")[1], re.M)
    assert [int(r[0]) for r in rows] == [0, 1]
    assert all(float(after) <= float(before) for _, before, after in rows)  # the fit never increases the error


def test_card_of_reused_statistics_and_of_no_calibration(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    build_dense(make_config(moe, "router_weighted", calib_dir), str(tmp_path / "first"), MergeOptions(quiet=True))
    build_dense(
        make_config(moe, "router_weighted", calib_dir, aggregate="mean_prob"),
        str(tmp_path / "second"),
        MergeOptions(quiet=True),
        stats_path=str(tmp_path / "first"),
    )
    card = (tmp_path / "second" / "README.md").read_text()
    assert "reused from an earlier run (`--stats`, `router_stats.safetensors`)" in card
    assert f"| `{calib_dir}` | 8 | 32 |" in card and "## Measured" not in card
    uniform = Moe2DenseConfig.model_validate({"merge_method": "expert_uniform", "models": [{"model": str(moe)}]})
    build_dense(uniform, str(tmp_path / "uniform"), MergeOptions(quiet=True))
    card = (tmp_path / "uniform" / "README.md").read_text()
    assert "## Calibration\n\nNone" in card and "## Method\n\n`expert_uniform`" in card
