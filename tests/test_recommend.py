# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The one recommended conversion of `inspect`: equal to the shipped configs, written as a YAML
config that `merge` runs as it is; and the warning of a merge that averages unaligned experts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import assert_one_line_error
from mergekit_moe2dense.cli import main
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.inspection import VERDICTS
from mergekit_moe2dense.job import ConversionJob
from mergekit_moe2dense.recommend import (
    CALIBRATION_PLACEHOLDER,
    RecommendationError,
    averaging_warning,
    config_yaml,
    recommend,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


# -- the recommendation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "verdict, output, preset",
    [
        ("aligned", "dense", "aligned.yml"),
        ("permuted", "dense", "from_scratch.yml"),
        ("unrelated", "dense", "from_scratch.yml"),
        ("aligned", "moe", "smaller_moe.yml"),
        ("unrelated", "moe", "smaller_moe.yml"),
    ],
)
def test_recommendation_is_the_shipped_config_of_its_case(verdict, output, preset):
    config = shipped(preset)
    rec = recommend(verdict, output, num_experts=2 * config["parameters"].get("num_experts", 4))
    assert rec.preset == f"configs/{preset}"
    assert (rec.merge_method, rec.parameters) == (config["merge_method"], config["parameters"])
    assert rec.num_samples == config["calibration"]["num_samples"]


def test_dense_recommendation_averages_only_aligned_experts():
    for verdict in VERDICTS:
        averaging = averaging_warning(recommend(verdict).merge_method, verdict)
        assert averaging is None
        assert (recommend(verdict).merge_method == "router_weighted") == (verdict == "aligned")


def test_smaller_moe_keeps_half_the_experts_or_the_number_asked():
    assert recommend("aligned", "moe", num_experts=9).parameters["num_experts"] == 4
    assert recommend("aligned", "moe", num_experts=2).parameters["num_experts"] == 1
    assert recommend("aligned", "moe", num_experts=8, target_experts=6).parameters["num_experts"] == 6


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(verdict="aligned", target_experts=2), "give --output moe"),
        (dict(verdict="aligned", output="moe", num_experts=4, target_experts=5), "out of range"),
        (dict(verdict="similar"), "unknown verdict"),
    ],
)
def test_impossible_recommendations_are_refused(kwargs, fragment):
    with pytest.raises(RecommendationError, match=fragment):
        recommend(**kwargs)


@pytest.mark.parametrize("dataset", ["/data/calib dir", None])
def test_written_config_is_the_recommendation_and_validates(dataset):
    rec = recommend("unrelated")
    text = config_yaml(rec, "/models/my moe", dataset, seq_len=256)
    loaded = yaml.safe_load(text)
    calibration = {"dataset": dataset or CALIBRATION_PLACEHOLDER, "num_samples": 512, "seq_len": 256}
    assert loaded == rec.config("/models/my moe", calibration)
    Moe2DenseConfig.model_validate(loaded)
    assert ("FILL IN" in text) == (dataset is None)
    assert "configs/from_scratch.yml" in text


def test_averaging_warning_names_the_method_to_use_instead():
    assert averaging_warning("router_weighted", "aligned") is None
    assert averaging_warning("concat", "unrelated") is None
    warning = averaging_warning("expert_uniform", "unrelated")
    assert warning.verdict == "unrelated" and warning.instead.startswith("concat")
    assert "expert_uniform" in warning.message and "Use concat" in warning.message


# -- on tiny models ----------------------------------------------------------------------


def merge_config(model: Path, method: str, calib_dir: Path) -> Moe2DenseConfig:
    return Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(model)}],
            "calibration": {"dataset": str(calib_dir), "num_samples": 4, "seq_len": 32},
        }
    )


@pytest.mark.parametrize(
    "fixture, method, verdict",
    [
        ("random_moe", "router_weighted", "unrelated"),
        ("random_moe", "expert_uniform", "unrelated"),
        ("random_moe", "concat", None),  # not an averaging method: nothing to check
        ("identical_moe", "router_weighted", None),  # aligned experts: averaging is right
    ],
)
def test_merge_warns_before_the_work_when_it_averages_unaligned_experts(
    fixture, method, verdict, request, calib_dir, tmp_path, caplog
):
    model = request.getfixturevalue(fixture)["legacy"]
    with caplog.at_level(logging.WARNING, logger="mergekit_moe2dense.job"):
        job = ConversionJob.prepare(merge_config(model, method, calib_dir), str(tmp_path / "out"))
    warned = [record.getMessage() for record in caplog.records if record.name == "mergekit_moe2dense.job"]
    if verdict is None:
        assert job.expert_warning is None and warned == []
    else:
        assert job.expert_warning.verdict == verdict and job.expert_warning.method == method
        assert len(warned) == 1 and f"they are {verdict}" in warned[0] and "Use concat" in warned[0]
    assert not (tmp_path / "out").exists()  # a warning, before any work


def run(*args):
    return CliRunner().invoke(main, [*map(str, args)])


@pytest.mark.parametrize(
    "fixture, flags, method",
    [
        ("random_moe", [], "concat"),
        ("identical_moe", ["--output", "moe", "--target-experts", 3], "prune_experts"),
    ],
)
def test_inspect_writes_a_config_that_merge_runs_as_it_is(fixture, flags, method, request, calib_dir, tmp_path):
    model = request.getfixturevalue(fixture)["legacy"]
    config = tmp_path / "recommended.yml"
    data = ["--data", calib_dir, "--num-samples", 4, "--seq-len", 32]
    result = run("inspect", model, *data, *flags, "--write-config", config)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-2:]
    assert last[0].startswith(f"recommended for a {'smaller MoE' if flags else 'dense model'}: {method} (")
    assert last[1] == f"wrote {config}; run it: mergekit-moe2dense {config} OUT"
    written = yaml.safe_load(config.read_text())
    assert written["models"] == [{"model": str(model)}] and written["calibration"]["dataset"] == str(calib_dir)
    assert written["calibration"]["seq_len"] == 256  # the tiny model's context, under the usual 512
    merged = run(config, tmp_path / "out")
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "out" / "expert_weights.json").read_text())["method"] == method


def test_inspect_from_stats_writes_a_placeholder_to_fill_in(random_moe, tmp_path):
    config = tmp_path / "recommended.yml"
    result = run("inspect", random_moe["legacy"], "--write-config", config)
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip().splitlines()[-1] == "fill in its calibration.dataset first (inspect ran without --data)"
    )
    assert yaml.safe_load(config.read_text())["calibration"]["dataset"] == CALIBRATION_PLACEHOLDER
    assert "FILL IN" in config.read_text()


def test_target_experts_out_of_range_is_refused_before_any_tensor_is_read(random_moe, tmp_path):
    result = run("inspect", random_moe["legacy"], "--output", "moe", "--target-experts", 9)
    assert_one_line_error(result, "--target-experts 9 is more than the model's 4 experts per layer")
    result = run("inspect", random_moe["legacy"], "--target-experts", 2)
    assert_one_line_error(result, "give --output moe")


def test_a_router_balanced_by_a_bias_is_pruned_by_diversity_as_its_shipped_config():
    config = shipped("smaller_moe_bias_balanced.yml")
    rec = recommend("unrelated", "moe", num_experts=2 * config["parameters"]["num_experts"], balanced_by_bias=True)
    assert rec.preset == "configs/smaller_moe_bias_balanced.yml"
    assert (rec.merge_method, rec.parameters) == (config["merge_method"], config["parameters"])
    assert rec.num_samples == config["calibration"]["num_samples"]
    # diversity needs the experts' outputs; without them the usual score, and a dense output is unchanged
    assert (
        recommend("unrelated", "moe", num_experts=8, balanced_by_bias=True, expert_outputs=False).parameters["score"]
        == "reap"
    )
    assert recommend("unrelated", balanced_by_bias=True) == recommend("unrelated")


def test_inspect_of_a_glm_moe_writes_the_diversity_pruning_that_merge_runs(tokenizer_dir, calib_dir, tmp_path):
    from tiny_families import make_family_moe

    model = make_family_moe("glm4_moe", tmp_path / "glm", tokenizer_dir)
    config = tmp_path / "recommended.yml"
    data = ["--data", calib_dir, "--num-samples", 4, "--seq-len", 32]
    result = run("inspect", model, *data, "--output", "moe", "--write-config", config)
    assert result.exit_code == 0, result.output
    assert "prune_experts (num_experts: 2, score: diversity, refit: down_proj)" in result.output
    written = yaml.safe_load(config.read_text())
    assert written["parameters"] == {"num_experts": 2, "score": "diversity", "refit": "down_proj"}
    assert written["calibration"]["num_samples"] == 512
    merged = run(config, tmp_path / "out")
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_routed_experts"] == 2


def test_families_balanced_by_a_bias_are_those_with_deepseek_v3_routing():
    from mergekit_moe2dense.families import FAMILIES

    balanced = {family.name for family in FAMILIES if family.balanced_by_bias}
    assert {"deepseek_v3", "glm4_moe"} <= balanced
    assert not balanced & {"mixtral", "qwen3_moe", "deepseek_v2", "gpt_oss", "llama4", "olmoe"}


def test_a_family_without_recorded_expert_outputs_is_recommended_a_score_it_records():
    assert recommend("unrelated", expert_outputs=False).parameters["score"] == "contribution"
    assert recommend("unrelated").parameters["score"] == "usage_diversity"
