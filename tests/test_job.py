# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""One run, one pipeline: the calibration text is tokenized once, and computed tensors
(re-fitted projections, new routers) reach the output without a round trip through disk."""

from __future__ import annotations

import os
import sys

import pytest
import safetensors.torch
import torch
from mergekit.options import MergeOptions

from helpers import assert_one_line_error, run_cli, write_config
from mergekit_moe2dense import job as job_module
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.config import Moe2DenseConfig


def _config(moe, calib_dir, method, **params):
    return Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(moe)}],
            "parameters": params,
            "calibration": {"dataset": str(calib_dir), "num_samples": 8, "seq_len": 32, "batch_size": 4},
            "dtype": "float32",
        }
    )


def test_refit_run_tokenizes_the_calibration_text_once(random_moe, calib_dir, tmp_path, monkeypatch):
    calls = []
    original = job_module.load_calibration_batches

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(job_module, "load_calibration_batches", counting)
    config = _config(random_moe["legacy"], calib_dir, "router_weighted", refit="down_proj", refit_gate_up="regmean")
    build_dense(config, str(tmp_path / "out"), MergeOptions(quiet=True))
    assert len(calls) == 1


@pytest.mark.parametrize(
    "method, params",
    [("concat", {"refit": "down_proj"}), ("kmeans_multi_dense", {"output": "moe", "num_clusters": 2})],
)
def test_computed_tensors_are_not_written_to_be_read_back(random_moe, calib_dir, tmp_path, monkeypatch, method, params):
    written = []
    original = safetensors.torch.save_file

    def recording(tensors, filename, *args, **kwargs):
        written.append(os.path.basename(filename))
        return original(tensors, filename, *args, **kwargs)

    # every module that bound the function by name, too (`from safetensors.torch import save_file`)
    for module in [safetensors.torch] + [
        m for n, m in sys.modules.items() if n.startswith(("mergekit", "safetensors"))
    ]:
        if getattr(module, "save_file", None) is original:
            monkeypatch.setattr(module, "save_file", recording)
    out = tmp_path / "out"
    build_dense(_config(random_moe["legacy"], calib_dir, method, **params), str(out), MergeOptions(quiet=True))
    # the model itself is written by writer.ShardWriter (pwrite, not save_file): the statistics are
    # the only file save_file writes, so no computed tensor went to disk to be read back
    assert sorted(written) == ["router_stats.safetensors"]
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _model_opened(*args, **kwargs):
    pytest.fail("the model was opened")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
        pytest.param(["--cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
        (["--device", "tpu"], "--device tpu: not a device torch knows"),
    ],
)
def test_merge_refuses_an_unusable_device_before_any_work(
    random_moe, calib_dir, tmp_path, monkeypatch, flags, fragment
):
    monkeypatch.setattr(job_module.SourceModel, "open", _model_opened)
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir)
    assert_one_line_error(run_cli(config, tmp_path / "out", *flags), fragment)
    assert not (tmp_path / "out").exists()


@NO_CUDA
def test_merge_refuses_a_device_map_onto_an_absent_gpu(random_moe, calib_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(job_module.SourceModel, "open", _model_opened)
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir)
    config.write_text(config.read_text().replace("calibration:\n", "calibration:\n  device_map: {'': 0}\n"))
    assert_one_line_error(run_cli(config, tmp_path / "out"), "calibration.device_map puts the whole model on 0")
    assert not (tmp_path / "out").exists()
