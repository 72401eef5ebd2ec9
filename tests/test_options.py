# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Every mergekit option is honoured or refused; none is silently ignored."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from mergekit.options import MergeOptions

from mergekit_moe2dense.cli import main
from mergekit_moe2dense.options import HONOURED, REFUSED, OptionError, check_options


def test_every_mergekit_option_is_either_honoured_or_refused():
    fields = set(MergeOptions.model_fields)
    assert fields == set(HONOURED) | set(REFUSED)
    assert not set(HONOURED) & set(REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_options_fail_with_the_reason(name):
    value = "x" if MergeOptions.model_fields[name].annotation in (str, "Optional[str]") else True
    if name in ("lora_merge_cache", "lora_merge_dtype"):
        value = "x"
    with pytest.raises(OptionError, match=f"--{name.replace('_', '-')} is not supported"):
        check_options(MergeOptions(**{name: value}))


def test_defaults_pass():
    check_options(MergeOptions())


def test_refused_option_from_the_cli_is_one_line_before_any_work(random_moe, tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: expert_uniform\nmodels:\n  - model: {random_moe['legacy']}\n")
    result = CliRunner().invoke(main, ["merge", str(config), str(tmp_path / "out"), "--multi-gpu"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --multi-gpu is not supported by mergekit-moe2dense: the merge runs on one device (--cuda); "
        "run the calibration on several GPUs under torchrun"
    )
    assert not (tmp_path / "out").exists()


def test_async_write_and_small_shards_write_the_same_model(random_moe, tmp_path):
    """async_write / write_threads / out_shard_size reach mergekit's writer."""
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: expert_uniform\nmodels:\n  - model: {random_moe['legacy']}\ndtype: float32\n")
    plain = CliRunner().invoke(main, ["merge", str(config), str(tmp_path / "a"), "--quiet"])
    sharded = CliRunner().invoke(
        main,
        [
            "merge",
            str(config),
            str(tmp_path / "b"),
            "--quiet",
            "--async-write",
            "--write-threads",
            "2",
            "--out-shard-size",
            "20K",
        ],
    )
    assert plain.exit_code == 0 and sharded.exit_code == 0, sharded.output
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from safetensors.torch import load_file

    whole = load_file(tmp_path / "a" / "model.safetensors")
    parts = {}
    for shard in set(index["weight_map"].values()):
        parts.update(load_file(tmp_path / "b" / shard))
    assert whole.keys() == parts.keys()
    assert all(whole[k].equal(parts[k]) for k in whole)
