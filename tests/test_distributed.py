# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration split over 2 gloo processes under torchrun equals one process, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_moe2dense.build import STATS_FILE, build_dense
from mergekit_moe2dense.calibration.distributed import rank_batches
from mergekit_moe2dense.config import Moe2DenseConfig

BIN = Path(sys.executable).parent


def test_rank_batches_cover_every_batch_once():
    shares = [rank_batches(7, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(7))
    assert shares[0] == [0, 3, 6]


@pytest.mark.slow  # torchrun starts 2 worker processes
@pytest.mark.parametrize("engine", ["full", "layerwise"])
def test_torchrun_two_processes_match_one(random_moe, calib_dir, tmp_path, engine):
    config = {
        "merge_method": "router_weighted",
        "models": [{"model": str(random_moe["legacy"])}],
        # 5 batches: uneven across 2 ranks; samples span every batch
        "calibration": {
            "dataset": str(calib_dir),
            "num_samples": 9,
            "seq_len": 24,
            "batch_size": 2,
            "max_token_samples": 60,
            "engine": engine,
        },
        "dtype": "float32",
    }
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(BIN / "mergekit-moe2dense"),
            str(path),
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("*.incomplete-*"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: same kernels, same rounding
    try:
        one = build_dense(Moe2DenseConfig.model_validate(config), str(tmp_path / "one"), MergeOptions(quiet=True))
    finally:
        torch.set_num_threads(threads)
    assert one.statistics.samples.abs().sum(-1).gt(0).all()  # every sample slot was filled
    two, ref = load_file(out / STATS_FILE), load_file(tmp_path / "one" / STATS_FILE)
    assert two.keys() == ref.keys()
    for name in ref:
        assert torch.equal(two[name], ref[name]), name
    dense_two, dense_one = load_file(out / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(dense_two[k], dense_one[k]) for k in dense_one)
