# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card: a Hub base model only when the source is a Hub id; the method, its
parameters, the calibration data and the figures measured while converting; the tool's
version; no local path; the evaluation results; a pruned model's kept experts; a healed
model's lineage."""

from __future__ import annotations

import json
import re

from mergekit.options import MergeOptions

from helpers import make_config
from mergekit_moe2dense.build import STATS_FILE, build_dense
from mergekit_moe2dense.calibration import RouterStatistics
from mergekit_moe2dense.card import _write_card, append_evaluation, conversion_lineage, tool_version, write_heal_card
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
    assert f"| `{calib_dir.name}` | 8 | 32 | {stats.tokens} |" in card
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
    assert f"| `{calib_dir.name}` | 8 | 32 |" in card and "## Measured" not in card
    uniform = Moe2DenseConfig.model_validate({"merge_method": "expert_uniform", "models": [{"model": str(moe)}]})
    build_dense(uniform, str(tmp_path / "uniform"), MergeOptions(quiet=True))
    card = (tmp_path / "uniform" / "README.md").read_text()
    assert "## Calibration\n\nNone" in card and "## Method\n\n`expert_uniform`" in card


def test_every_card_has_the_version_and_no_local_path(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    config = make_config(moe, "router_weighted", calib_dir)
    build_dense(config, str(tmp_path / "dense"), MergeOptions(quiet=True), config_source=config.to_yaml())
    card = (tmp_path / "dense" / "README.md").read_text()
    assert f"Made with mergekit-moe2dense {tool_version()}." in card and tool_version() != "unknown"
    assert f"model `{moe.name}`" in card and f"model: {moe.name}" in card.split("```yaml")[1]
    assert str(moe.parent) not in card and str(calib_dir.parent) not in card  # prose and YAML


def test_a_pruned_models_card_lists_the_kept_experts(random_moe, calib_dir, tmp_path):
    build_dense(
        make_config(random_moe["legacy"], "prune_experts", calib_dir, num_experts=2),
        str(tmp_path / "pruned"),
        MergeOptions(quiet=True),
    )
    card = (tmp_path / "pruned" / "README.md").read_text()
    groups = json.loads((tmp_path / "pruned" / "expert_weights.json").read_text())["groups"]
    assert "## Experts kept per layer" in card and "were kept and the others removed" in card
    for index, layer in enumerate(groups):
        assert f"| {index} | {', '.join(str(group[0]) for group in layer)} |" in card
    assert "merge of a group" not in card and "Original experts behind" not in card


def test_eval_results_are_appended_from_the_json(tmp_path):
    (tmp_path / "README.md").write_text("# card\n")
    records = [
        {"model": "/abs/moe", "perplexity": 10.0, "tokens": 64},
        {"model": str(tmp_path), "perplexity": 11.23456, "tokens": 64},
    ]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    append_evaluation(str(tmp_path), str(tmp_path / "eval.json"))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# card\n") and "## Evaluation" in card
    assert "| `moe` | 64 | 10.000 | 1.0000 |" in card and f"| `{tmp_path.name}` | 64 | 11.235 | 1.1235 |" in card
    assert "/abs" not in card and str(tmp_path.parent) not in card


def test_a_healed_models_card_keeps_the_lineage_with_round_figures(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    config = make_config(moe, "router_weighted", calib_dir)
    build_dense(config, str(tmp_path / "student"), MergeOptions(quiet=True), config_source=config.to_yaml())
    record = {
        "student": str(tmp_path / "student"), "teacher": str(moe), "data": str(calib_dir), "tokens": 512,
        "steps": 4, "steps_from_checkpoint": 0, "final_loss": 1.23456789, "lora_rank": None,
        "teacher_cache": None, "teacher_top_k": None, "eval_data": None, "perplexity_before": None,
        "settings": {"temperature": 1.0, "lm_weight": 0.0, "lr": 0.0001, "seq_len": 32},
    }  # fmt: skip
    (tmp_path / "healed").mkdir()
    write_heal_card(str(tmp_path / "healed"), record, "heal.json", conversion_lineage(str(tmp_path / "student")))
    card = (tmp_path / "healed" / "README.md").read_text()
    lineage = card.split("## Lineage")[1]
    assert f"1. The Mixture-of-Experts model `{moe.name}`." in lineage
    assert "2. Converted to a dense model by mergekit-moe2dense with the `router_weighted` method" in lineage
    assert "3. Healed by distillation" in lineage and "| 0 | 0." in lineage  # the conversion's weights
    assert "final loss 1.235" in card and "1.23456789" not in card
    assert f"Made with mergekit-moe2dense {tool_version()}." in card and str(tmp_path) not in card


def test_a_healed_models_tokenizer_config_has_no_local_load_keys(tokenizer_dir, tmp_path):
    import transformers

    from mergekit_moe2dense.training.distill import _save_tokenizer

    _save_tokenizer(transformers.AutoTokenizer.from_pretrained(tokenizer_dir), str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "is_local" not in config and "local_files_only" not in config and config["eos_token"] == "</s>"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token == "</s>"


def test_a_second_evaluation_replaces_the_first_and_keeps_the_rest_of_the_card(tmp_path):
    (tmp_path / "README.md").write_text("# card\n\n## Method\n\ntext\n")
    (tmp_path / "a.json").write_text(json.dumps([{"model": "moe", "perplexity": 10.0, "tokens": 64}]))
    (tmp_path / "b.json").write_text(json.dumps([{"model": "moe", "perplexity": 12.0, "tokens": 64}]))
    append_evaluation(str(tmp_path), str(tmp_path / "a.json"))
    append_evaluation(str(tmp_path), str(tmp_path / "b.json"))
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "12.000" in card and "10.000" not in card
    assert card.startswith("# card\n\n## Method\n\ntext\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written whole, nothing left
