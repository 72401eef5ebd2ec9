# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""oneDNN's primitive cache: off for a conversion or a calibration (their bf16 matmuls change
shape with every layer), left alone by importing the package (training and evaluation need it);
and the reference counts that decide whether a freed layer's memory may be reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from helpers import make_config
from mergekit_moe2dense import memory
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.memory import is_exclusively_held

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
REPO = Path(__file__).resolve().parents[1]


def test_importing_the_package_leaves_the_cache_alone():
    env = {key: value for key, value in os.environ.items() if key != VARIABLE}
    code = (
        "import os, mergekit_moe2dense, mergekit_moe2dense.cli, mergekit_moe2dense.training, "
        "mergekit_moe2dense.perplexity, mergekit_moe2dense.methods; "
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


def _held_alone(store: dict) -> dict[str, bool]:
    """`is_exclusively_held` as the layer stream asks it: each tensor of a module's dict, held by
    the dict and the loop's variable (a loop over `store.items()` would hold one more: the
    iterator keeps its last pair)."""
    found = []
    for tensor in store.values():
        found.append(is_exclusively_held(tensor, holders=2))
    return dict(zip(store, found))


def test_private_storage_count_counts_the_tensors_on_a_storage():
    """What `is_exclusively_held` relies on in torch: one storage reference per tensor on it, plus
    the storage object asked for."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        pytest.skip("this torch has no torch._C._storage_Use_Count: is_exclusively_held answers False")
    tensor = torch.zeros(4)
    assert torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) == 2
    view = tensor[:2]
    assert torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) == 3
    del view
    assert torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) == 2


def test_a_tensor_held_elsewhere_or_viewed_is_reported_as_shared():
    store = {"alone": torch.zeros(4), "held": torch.zeros(4), "viewed": torch.zeros(4), "view": None}
    kept = store["held"]  # a visitor keeps a parameter
    store["view"] = store["viewed"][:2]  # and a view shares another's memory
    found = _held_alone(store)
    assert not found["held"] and not found["viewed"] and not found["view"]
    assert found["alone"] == memory._REFERENCE_COUNTS_TESTED
    del kept


def test_a_tensor_its_module_alone_holds_is_reported_as_unshared():
    """On the versions tested, the one case in which the layer stream reuses memory."""
    if not memory._REFERENCE_COUNTS_TESTED:
        pytest.skip("untested Python or torch version: is_exclusively_held answers False")
    module = torch.nn.Linear(3, 2)
    assert _held_alone(module._parameters) == {"weight": True, "bias": True}
    weight = module.weight
    assert _held_alone(module._parameters) == {"weight": False, "bias": True}
    del weight


def test_untested_versions_or_a_missing_private_call_fall_back_to_shared(monkeypatch):
    assert memory._reference_counts_tested() == memory._REFERENCE_COUNTS_TESTED
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    assert not memory._reference_counts_tested()
    monkeypatch.setattr(torch, "__version__", "nightly")
    assert not memory._reference_counts_tested()
    monkeypatch.undo()
    monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)
    assert not memory._reference_counts_tested()
    monkeypatch.setattr(memory, "_REFERENCE_COUNTS_TESTED", False)
    assert not is_exclusively_held(torch.zeros(2), holders=10)
