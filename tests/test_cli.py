# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Both command lines end to end, and every bad input as a one-line error."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers
import yaml
from click.testing import CliRunner

from helpers import BIN, assert_one_line_error, make_mixtral, run_cli, write_config


@pytest.mark.slow  # a console script in a subprocess
@pytest.mark.parametrize("script", ["mergekit-moe2dense", "mergekit-yaml"])
def test_console_scripts_end_to_end(script, random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="top_k_tempered")
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / script), str(config), str(out), "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"
    assert (out / "expert_weights.json").is_file() and (out / "moe2dense" / "router_stats.safetensors").is_file()


def test_mergekit_yaml_leaves_other_methods_to_mergekit(random_moe, tmp_path):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    config = tmp_path / "linear.yml"
    model = str(random_moe["legacy"])
    config.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]})
    )
    result = CliRunner().invoke(mergekit_yaml, [str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == "mixtral"


def test_mergekit_yaml_reports_errors_in_one_line(random_moe, calib_dir, tmp_path):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, temperature=0)
    result = CliRunner().invoke(mergekit_yaml, [str(config), str(tmp_path / "out")])
    assert_one_line_error(result, "temperature")


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("dense")
    config = transformers.MistralConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    transformers.MistralForCausalLM(config).save_pretrained(path)
    return path


def truncate_shard(tmp_path, moe) -> Path:
    copy = tmp_path / "truncated"
    shutil.copytree(moe, copy)
    shard = copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: os.path.getsize(shard) // 2])
    return copy


def missing_shard(tmp_path, moe) -> Path:
    copy = tmp_path / "sharded"
    shutil.copytree(moe, copy)
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}'
    )
    return copy


def test_errors_are_one_line_and_write_nothing(random_moe, calib_dir, dense_model, tmp_path, tokenizer_dir):
    moe = random_moe["legacy"]
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    other = make_mixtral(tmp_path / "other", tokenizer_dir, seed=7)
    stats_dir = tmp_path / "stats_run"
    assert run_cli(write_config(tmp_path / "s.yml", other, calib_dir), stats_dir).exit_code == 0
    phimoe = tmp_path / "phimoe"
    phimoe.mkdir()
    (phimoe / "config.json").write_text('{"model_type": "phimoe", "num_local_experts": 4}')

    cases = [
        (write_config(tmp_path / "a.yml", dense_model, calib_dir), [], "not a Mixture-of-Experts"),
        (write_config(tmp_path / "b.yml", phimoe, calib_dir), [], "supported"),
        (write_config(tmp_path / "c.yml", moe, calib_dir, method="frankenmerge"), [], "unknown merge_method"),
        (write_config(tmp_path / "d.yml", moe, calib_dir, temprature=1.0), [], "unknown parameter"),
        (write_config(tmp_path / "e.yml", moe, calib_dir, temperature=0), [], "temperature"),
        (
            write_config(tmp_path / "f.yml", moe, calib_dir, method="top_k_tempered", top_k=9),
            [],
            "top_k=9 is out of range",
        ),
        (write_config(tmp_path / "g.yml", moe, empty), [], "(no|empty).*(text|documents)|empty"),
        (
            write_config(tmp_path / "h.yml", moe, tmp_path / "nowhere"),
            [],
            "calibration dataset.*(no such file|not found)",
        ),
        (
            write_config(tmp_path / "i.yml", moe, calib_dir),
            ["--stats", stats_dir / "moe2dense" / "router_stats.safetensors"],
            "not on this model",
        ),
        (write_config(tmp_path / "i2.yml", moe, calib_dir), ["--stats", stats_dir], "not on this model"),
        (
            write_config(tmp_path / "i3.yml", moe, calib_dir),
            ["--stats", empty],
            "directory holds neither moe2dense/router_stats.safetensors nor router_stats.safetensors",
        ),
        (write_config(tmp_path / "j.yml", truncate_shard(tmp_path, moe), calib_dir), [], "truncated"),
        (write_config(tmp_path / "k.yml", missing_shard(tmp_path, moe), calib_dir), [], "missing shard"),
        (tmp_path / "no-such-config.yml", [], "config file not found"),
    ]
    for config, extra, fragment in cases:
        result = run_cli(config, out, *extra)
        assert_one_line_error(result, fragment)
        assert not out.exists(), f"{config.name} left {list(out.iterdir())}"
        assert not list(tmp_path.glob("out.incomplete-*"))


def test_existing_output_needs_overwrite(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="expert_uniform")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli(config, out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli(config, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_misspelt_config_key_is_an_error(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir)
    config.write_text(config.read_text().replace("num_samples", "num_sample"))
    assert_one_line_error(run_cli(config, tmp_path / "out"), "num_sample")


def test_eval_command_table_and_json(random_moe, calib_dir, tmp_path):
    import json

    out = tmp_path / "dense"
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="expert_uniform")
    assert run_cli(config, out).exit_code == 0
    json_path = tmp_path / "ppl.json"
    result = run_cli("eval", random_moe["legacy"], out, "--data", calib_dir, "--seq-len", 16, "--json", json_path)
    assert result.exit_code == 0, result.output
    rows = json.loads(json_path.read_text())
    assert [row["model"] for row in rows] == [str(random_moe["legacy"]), str(out)]
    assert all(row["perplexity"] > 1 for row in rows)
    assert str(out) in result.output


def test_eval_missing_model_is_one_line(calib_dir, tmp_path):
    assert_one_line_error(run_cli("eval", tmp_path / "nope", "--data", calib_dir), "model directory not found")


@pytest.mark.parametrize("example", sorted(Path(__file__).parent.parent.glob("configs/*.yml")))
def test_example_configs_are_valid(example, random_moe, calib_dir, tmp_path):
    """Every shipped config parses and, pointed at a tiny model, runs."""
    from mergekit_moe2dense.config import Moe2DenseConfig

    data = yaml.safe_load(example.read_text())
    data["models"][0]["model"] = str(random_moe["legacy"])
    if "calibration" in data:
        data["calibration"].update(dataset=str(calib_dir), num_samples=4, seq_len=32)
    config = tmp_path / example.name
    config.write_text(yaml.safe_dump(data))
    Moe2DenseConfig.from_file(str(config))
    result = run_cli(config, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output


def test_merge_prefetches_the_source_and_ignores_configs_it_cannot_read(random_moe, tmp_path, monkeypatch):
    import gc

    from mergekit_moe2dense import cli, cli_startup

    random_moe = random_moe["legacy"]
    started = []
    monkeypatch.setattr(cli_startup, "prefetch_model_start", lambda path, nbytes: started.append((path, nbytes)))
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump({"merge_method": "expert_uniform", "models": [{"model": str(random_moe)}]}))
    cli_startup.prefetch_source(str(good))
    assert started and started[0][0] == str(random_moe) and 0 < started[0][1] <= 4 << 30
    bad = tmp_path / "bad.yml"
    for text in ["models: [", "models: 3", "models: [{model: /no/such/dir}]", "\0\xff"]:
        bad.write_text(text, errors="surrogateescape")
        cli_startup.prefetch_source(str(bad))  # no error: the command reports it
    cli_startup.prefetch_source(str(tmp_path / "missing.yml"))
    assert len(started) == 1
    out = tmp_path / "dense"
    result = CliRunner().invoke(cli.main, [str(good), str(out)])  # the collector is back on when it runs
    assert result.exit_code == 0, result.output
    assert gc.isenabled()
    result = CliRunner().invoke(cli.main, [str(good)])  # a usage error: on again as well
    assert result.exit_code == 2 and gc.isenabled()
    gc.unfreeze()
