# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`kmeans_multi_dense` end to end on tiny MoEs: k dense models, the rebuilt MoE, errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from helpers import assert_one_line_error, logits_of, run_cli, write_config
from mergekit_moe2dense.build import STATS_FILE, build_dense
from mergekit_moe2dense.calibration import RouterStatistics
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.methods import MethodError, get_method
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
METHOD = "kmeans_multi_dense"


def make_config(model, calib_dir, method=METHOD, max_token_samples=16384, **params) -> Moe2DenseConfig:
    calibration = {"dataset": str(calib_dir), "num_samples": 8, "seq_len": 32, "batch_size": 3}
    return Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(model)}],
            "parameters": params,
            "calibration": {**calibration, "max_token_samples": max_token_samples},
            "dtype": "float32",
        }
    )


def test_k1_gives_the_router_weighted_tensors(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    build_dense(
        make_config(moe, calib_dir, "router_weighted", temperature=0.7, refit="none"), str(tmp_path / "rw"), OPTIONS
    )
    build_dense(make_config(moe, calib_dir, num_clusters=1, temperature=0.7), str(tmp_path / "km"), OPTIONS)
    theirs = load_file(tmp_path / "rw" / "model.safetensors")
    ours = load_file(tmp_path / "km" / "cluster_0" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-7)


def test_dense_output_holds_one_model_per_cluster(random_moe, calib_dir, tmp_path):
    out = tmp_path / "out"
    result = build_dense(make_config(random_moe["fused"], calib_dir, num_clusters=2), str(out), OPTIONS)
    summary = json.loads((out / "clusters.json").read_text())
    shares = [c["token_share"] for c in summary["clusters"]]
    assert [c["path"] for c in summary["clusters"]] == ["cluster_0", "cluster_1"]
    assert shares[0] >= shares[1] > 0 and abs(sum(shares) - 1) < 1e-9
    assert (out / STATS_FILE).is_file()
    for index in range(2):
        directory = out / f"cluster_{index}"
        record = json.loads((directory / "expert_weights.json").read_text())
        assert record["token_share"] == shares[index] and record["cluster"] == index
        torch.testing.assert_close(torch.tensor(record["layers"]), result.layer_weights[index].float())
        assert "token_share" in (directory / "README.md").read_text()
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert type(model).__name__ == "MistralForCausalLM"
    assert not torch.allclose(result.layer_weights[0], result.layer_weights[1])


@pytest.mark.parametrize("layout,router,k", [("legacy", "closed_form", 2), ("fused", "fitted", 3)])
def test_rebuilt_moe_of_identical_experts_reproduces_logits(identical_moe, calib_dir, tmp_path, layout, router, k):
    moe, out = identical_moe[layout], tmp_path / "moe"
    build_dense(make_config(moe, calib_dir, num_clusters=k, output="moe", router=router), str(out), OPTIONS)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(rebuilt).__name__ == "MixtralForCausalLM"
    assert (rebuilt.config.num_local_experts, rebuilt.config.num_experts_per_tok) == (k, 2)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(out, ids), logits_of(moe, ids), rtol=0, atol=1e-5)
    # the routers are stashed in a directory (.routers-XXXX) inside the staging directory
    # while the graph reads them; the published MoE holds files only (and the statistics in
    # moe2dense/), and nothing else is left
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["moe2dense"]
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]
    assert "token share" in (out / "README.md").read_text()
    record = json.loads((out / "expert_weights.json").read_text())
    assert torch.tensor(record["experts"]).shape == (k, 2, 4) and abs(sum(record["token_share"]) - 1) < 1e-9


@pytest.mark.parametrize("family, layout", [("qwen3_moe", "fused"), ("olmoe", "legacy"), ("qwen2_moe", "fused")])
def test_rebuilt_moe_of_other_families_reproduces_logits(family, layout, tokenizer_dir, calib_dir, tmp_path):
    moe = make_family_moe(family, tmp_path / "src", tokenizer_dir, identical=True, layout=layout)
    out = tmp_path / "moe"
    build_dense(make_config(moe, calib_dir, num_clusters=2, output="moe"), str(out), OPTIONS)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(rebuilt).__name__ == type(transformers.AutoModelForCausalLM.from_pretrained(moe)).__name__
    assert (rebuilt.config.num_experts, rebuilt.config.num_experts_per_tok) == (2, 2)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(out, ids), logits_of(moe, ids), rtol=0, atol=1e-5)


def test_fitted_router_is_written_and_routes_calibration_tokens_to_their_cluster(random_moe, calib_dir, tmp_path):
    out = tmp_path / "moe"
    config = make_config(random_moe["legacy"], calib_dir, num_clusters=2, output="moe", router="fitted")
    build_dense(config, str(out), OPTIONS)
    stats = RouterStatistics.load(out / STATS_FILE)
    assert stats.has_router_inputs and stats.router_inputs.shape[-1] == 32
    method = get_method(METHOD)
    params = method.resolve_parameters(config.method_parameters, num_experts=4, top_k=2)
    labels = method.cluster_weights(stats, params).decomposition.labels
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for position, layer in enumerate(rebuilt.model.layers):
        routed = (stats.router_inputs[position] @ layer.mlp.gate.weight.T).argmax(-1)
        assert (routed.numpy() == labels[position]).mean() > 0.9


def test_errors_before_any_output(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    with pytest.raises(MethodError, match="moe_top_k=3 is out of range"):
        build_dense(
            make_config(moe, calib_dir, num_clusters=2, output="moe", moe_top_k=3), str(tmp_path / "a"), OPTIONS
        )
    with pytest.raises(MethodError, match="unknown parameter"):
        build_dense(make_config(moe, calib_dir, num_cluster=2), str(tmp_path / "a"), OPTIONS)
    with pytest.raises(MethodError, match="svd with 10 clusters needs 5 directions"):
        build_dense(
            make_config(moe, calib_dir, num_clusters=10, decomposition="svd", clustering="per_layer"),
            str(tmp_path / "a"),
            OPTIONS,
        )
    with pytest.raises(MethodError, match="max_token_samples >= 4"):
        build_dense(make_config(moe, calib_dir, max_token_samples=3, num_clusters=4), str(tmp_path / "a"), OPTIONS)
    assert not any(p.name.startswith("a") for p in tmp_path.iterdir())


def test_cli_reports_clusters_and_refuses_stats_without_router_inputs(random_moe, calib_dir, tmp_path):
    first = tmp_path / "first"
    result = run_cli(
        write_config(tmp_path / "a.yml", random_moe["legacy"], calib_dir, METHOD, num_clusters=3), first, "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert "2 layers, 3 clusters" in result.output
    config = write_config(tmp_path / "b.yml", random_moe["legacy"], calib_dir, METHOD, output="moe", router="fitted")
    result = run_cli(config, tmp_path / "b", "--stats", first / STATS_FILE)
    assert_one_line_error(result, "needs router inputs")
    assert not any(p.name.startswith("b") and p.is_dir() for p in tmp_path.iterdir())
