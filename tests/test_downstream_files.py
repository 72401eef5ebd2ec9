# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Every output directory holds model shards only, by the rules downstream loaders use to
find weights. vLLM cannot load a directory where any other *.safetensors sits beside the
model (`There is no module or parameter named 'contribution_sum'`)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import make_config
from mergekit_moe2dense.build import STATS_FILE, build_dense
from mergekit_moe2dense.statistics import resolve_stats_path

INDEX = "model.safetensors.index.json"


def vllm_weight_files(directory: Path) -> list[str]:
    """vLLM's DefaultModelLoader._prepare_weights for a local directory (load_format auto,
    i.e. "hf"): the first pattern of *.safetensors, *.bin, *.pt that matches at the top of
    the directory (not below it), then, for safetensors, only the files the index lists if
    there is an index (filter_duplicate_safetensors_files); every match if there is none."""
    files: list[str] = []
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        files = glob.glob(os.path.join(directory, pattern))
        if files:
            break
    if files and files[0].endswith(".safetensors") and (directory / INDEX).is_file():
        listed = {
            os.path.join(directory, f) for f in json.loads((directory / INDEX).read_text())["weight_map"].values()
        }
        files = [f for f in files if f in listed]
    return sorted(os.path.basename(f) for f in files)


def llama_cpp_weight_files(directory: Path) -> list[str]:
    """llama.cpp's convert_hf_to_gguf.py (ModelBase.index_tensors): the files at the top of
    the directory named model*.safetensors (else pytorch_model*.bin), or the files the
    index lists when there is one."""
    names = sorted(n for n in os.listdir(directory) if n.startswith("model") and n.endswith(".safetensors"))
    if not names:
        names = sorted(n for n in os.listdir(directory) if n.startswith("pytorch_model") and n.endswith(".bin"))
    if (directory / INDEX).is_file():
        names = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    return names


def every_safetensors(directory: Path) -> list[str]:
    """The bluntest rule (loaders that read every *.safetensors of a directory)."""
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))


RULES = {"vllm": vllm_weight_files, "llama.cpp": llama_cpp_weight_files, "*.safetensors": every_safetensors}


def model_tensor_names(directory: Path) -> set[str]:
    """The model's tensors: those its index maps (or its one shard holds), which are exactly
    what transformers needs for the directory's config (no missing or unexpected keys)."""
    if (directory / INDEX).is_file():
        names = set(json.loads((directory / INDEX).read_text())["weight_map"])
    else:
        with safe_open(directory / "model.safetensors", "pt") as handle:
            names = set(handle.keys())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return names


def assert_only_model_shards(directory: Path) -> None:
    expected = model_tensor_names(directory)
    for rule_name, rule in RULES.items():
        files = rule(directory)
        assert files, f"{rule_name} finds no weights in {directory}"
        held: list[str] = []
        for name in files:
            assert re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name), (rule_name, name)
            with safe_open(directory / name, "pt") as handle:
                held += list(handle.keys())
        assert len(held) == len(set(held)), f"{rule_name}: a tensor is in two files"
        assert set(held) == expected, (rule_name, sorted(set(held) ^ expected))


@pytest.fixture(scope="module")
def outputs(random_moe, calib_dir, tmp_path_factory):
    """One output of each kind: a dense model (in several shards), k dense models, a rebuilt MoE."""
    root = tmp_path_factory.mktemp("outputs")
    moe = random_moe["legacy"]
    cases = {
        "dense": (make_config(moe, "router_weighted", calib_dir), MergeOptions(quiet=True, out_shard_size=20_000)),
        "clusters": (make_config(moe, "kmeans_multi_dense", calib_dir, num_clusters=2), MergeOptions(quiet=True)),
        "moe": (
            make_config(moe, "kmeans_multi_dense", calib_dir, num_clusters=2, output="moe"),
            MergeOptions(quiet=True),
        ),
    }
    for name, (config, options) in cases.items():
        build_dense(config, str(root / name), options)
    return root


def test_dense_output_holds_only_model_shards(outputs):
    out = outputs / "dense"
    assert (out / INDEX).is_file() and len(every_safetensors(out)) > 1  # really sharded
    assert_only_model_shards(out)
    assert (out / STATS_FILE).is_file()


def test_k_dense_outputs_hold_only_model_shards(outputs):
    out = outputs / "clusters"
    for cluster in ("cluster_0", "cluster_1"):
        assert_only_model_shards(out / cluster)
    assert all(rule(out) == [] for rule in RULES.values())  # OUT itself is no model
    assert (out / STATS_FILE).is_file()


def test_rebuilt_moe_holds_only_model_shards(outputs):
    out = outputs / "moe"
    assert_only_model_shards(out)
    assert (out / STATS_FILE).is_file()


def test_the_rules_reject_the_old_layout(outputs, tmp_path):
    """Statistics where earlier versions wrote them make vLLM load a file that is no model."""
    old = tmp_path / "old"
    shutil.copytree(outputs / "moe", old)
    shutil.move(old / STATS_FILE, old / "router_stats.safetensors")
    assert "router_stats.safetensors" in vllm_weight_files(old)
    with pytest.raises(AssertionError):
        assert_only_model_shards(old)


def test_stats_are_found_in_old_and_new_locations(outputs, random_moe, calib_dir, tmp_path):
    new = outputs / "dense"
    assert resolve_stats_path(new) == str(new / STATS_FILE)
    assert resolve_stats_path(new / STATS_FILE) == str(new / STATS_FILE)
    assert resolve_stats_path(new / "moe2dense") == str(new / STATS_FILE)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(new / STATS_FILE, old / "router_stats.safetensors")
    assert resolve_stats_path(old) == str(old / "router_stats.safetensors")
    # reused from either location, the statistics give the same model
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir, aggregate="selection_frequency")
    for stats, name in ((old, "from_old"), (new, "from_new")):
        build_dense(config, str(tmp_path / name), MergeOptions(quiet=True), stats_path=str(stats))
    written = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("from_old", "from_new")]
    assert written[0] == written[1]
