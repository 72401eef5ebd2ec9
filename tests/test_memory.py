# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""oneDNN's primitive cache: off for a conversion or a calibration (their bf16 matmuls change
shape with every layer), left alone by importing the package (training and evaluation need it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from helpers import make_config
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.checkpoint import SourceModel

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
REPO = Path(__file__).resolve().parents[1]


def test_importing_the_package_leaves_the_cache_alone():
    env = {key: value for key, value in os.environ.items() if key != VARIABLE}
    code = (
        "import os, mergekit_moe2dense, mergekit_moe2dense.cli, mergekit_moe2dense.heal, "
        "mergekit_moe2dense.evaluate, mergekit_moe2dense.methods; "
        f"print(os.environ.get({VARIABLE!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"


def test_a_conversion_turns_the_cache_off_unless_set(random_moe, calib_dir, tmp_path, monkeypatch):
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir)
    monkeypatch.setenv(VARIABLE, "64")  # the user's own setting wins
    build_dense(config, str(tmp_path / "first"), MergeOptions(quiet=True))
    assert os.environ[VARIABLE] == "64"
    monkeypatch.delenv(VARIABLE)
    # with the statistics of the first build: no calibration, the conversion's own entry point
    build_dense(config, str(tmp_path / "second"), MergeOptions(quiet=True), stats_path=str(tmp_path / "first"))
    assert os.environ[VARIABLE] == "0"


def test_a_calibration_turns_the_cache_off(random_moe, calib_dir, monkeypatch):
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir)
    _, batches = load_calibration_batches(str(random_moe["legacy"]), config.calibration)
    source = SourceModel.open(ModelReference.parse(str(random_moe["legacy"])))
    monkeypatch.delenv(VARIABLE, raising=False)
    collect_statistics(source, batches, config.calibration, progress=False)
    assert os.environ[VARIABLE] == "0"
