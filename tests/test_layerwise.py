# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-streaming engine against the whole-model forward."""

from __future__ import annotations

import pytest
import torch
from mergekit.common import ModelReference

from mergekit_moe2dense.calibration import load_calibration_batches, load_moe
from mergekit_moe2dense.calibration.runner import (
    collect_router_statistics,
    collect_router_statistics_layerwise,
)
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.config import CalibrationConfig


def calibration(calib_dir):
    return CalibrationConfig(dataset=str(calib_dir), num_samples=7, seq_len=24, batch_size=3, max_token_samples=50)


@pytest.mark.parametrize("layout, spill", [("legacy", False), ("fused", True)])
def test_layerwise_statistics_equal_full_forward(random_moe, calib_dir, tmp_path, layout, spill):
    path = random_moe[layout]
    calib = calibration(calib_dir)
    _, batches = load_calibration_batches(str(path), calib)
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding is exercised
    source = SourceModel.open(ModelReference.parse(str(path)))
    full = collect_router_statistics(
        load_moe(str(path), device="cpu", dtype=torch.float32), source.family, batches,
        max_token_samples=50, seed=3, progress=False,
    )
    streamed = collect_router_statistics_layerwise(
        source, batches, max_token_samples=50, seed=3, progress=False,
        spill_dir=str(tmp_path / "acts") if spill else None,
    )
    assert streamed.tokens == full.tokens > 0
    for name in ("logit_sum", "prob_sum", "selected", "gate_sum", "contribution_sum", "samples"):
        torch.testing.assert_close(getattr(streamed, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    assert full.samples.abs().sum() > 0
    if spill:
        assert not any((tmp_path / "acts").iterdir())  # spilled activations are removed


def test_build_with_layerwise_engine_matches_full(random_moe, calib_dir, tmp_path):
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig

    results = {}
    for engine in ("full", "layerwise"):
        config = Moe2DenseConfig.model_validate(
            {
                "merge_method": "router_weighted",
                "models": [{"model": str(random_moe["legacy"])}],
                "calibration": {"dataset": str(calib_dir), "num_samples": 6, "seq_len": 24, "engine": engine},
                "dtype": "float32",
            }
        )
        results[engine] = build_dense(config, str(tmp_path / engine), MergeOptions(quiet=True)).layer_weights
    torch.testing.assert_close(results["layerwise"], results["full"], rtol=1e-6, atol=1e-9)


def test_device_map_places_the_full_model_with_accelerate(random_moe, calib_dir, tmp_path, monkeypatch):
    """`device_map` goes to from_pretrained (accelerate; here everything lands on the CPU) and
    gives the same statistics; it is refused where it cannot apply."""
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import build_dense, calibration_engine, calibrate
    from mergekit_moe2dense.calibration import runner
    from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig

    def config(**calibration):
        return Moe2DenseConfig.model_validate(
            {
                "merge_method": "router_weighted",
                "models": [{"model": str(random_moe["legacy"])}],
                "calibration": {"dataset": str(calib_dir), "num_samples": 6, "seq_len": 24, **calibration},
            }
        )

    maps = []
    load = runner.load_moe

    def spy(path, **kwargs):
        maps.append(kwargs["device_map"])
        return load(path, **kwargs)

    monkeypatch.setattr("mergekit_moe2dense.build.load_moe", spy)
    source = SourceModel.open(ModelReference.parse(str(random_moe["legacy"])))
    options = MergeOptions(quiet=True)
    placed = calibrate(source, config(device_map="auto"), {}, options)
    plain = calibrate(source, config(engine="full"), {}, options)
    assert maps == ["auto", None]
    for name in ("prob_sum", "selected", "gate_sum", "samples"):
        torch.testing.assert_close(getattr(placed, name), getattr(plain, name), rtol=1e-6, atol=1e-6)
    assert calibration_engine(source, config(device_map="auto").calibration, "cpu") == "full"

    with pytest.raises(ConfigError, match="device_map"):
        build_dense(config(device_map="auto", engine="layerwise"), str(tmp_path / "a"), options)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="device_map"):
        build_dense(config(device_map="auto"), str(tmp_path / "b"), options)
    assert not list(tmp_path.iterdir())
