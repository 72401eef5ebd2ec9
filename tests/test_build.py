# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""End-to-end conversion on tiny models: exactness, layouts, outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import METHOD_PARAMS, logits_of, make_config, make_mixtral
from mergekit_moe2dense.build import STATS_FILE, WEIGHTS_FILE, build_dense

OPTIONS = MergeOptions(quiet=True)


@pytest.mark.parametrize("layout", ["legacy", "fused"])
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_identical_experts_give_moe_logits(identical_moe, calib_dir, tmp_path, layout, method):
    moe = identical_moe[layout]
    out = tmp_path / "dense"
    build_dense(make_config(moe, method, calib_dir, **METHOD_PARAMS[method]), str(out), OPTIONS)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(dense).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(logits_of(out, ids), logits_of(moe, ids), rtol=0, atol=1e-5)


def test_dense_config_carries_attention_settings(identical_moe, calib_dir, tmp_path, tokenizer_dir):
    moe = make_mixtral(
        tmp_path / "odd",
        tokenizer_dir,
        identical=True,
        rms_norm_eps=3e-6,
        sliding_window=7,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=True,
    )
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["rms_norm_eps"] == 3e-6 and config["sliding_window"] == 7 and config["head_dim"] == 16
    assert config["rope_parameters"]["rope_theta"] == 500.0 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert not {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"} & set(config)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(out, ids), logits_of(moe, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_one_hot_weights_reproduce_one_expert(random_moe, calib_dir, tmp_path, layout):
    moe = random_moe[layout]
    out = tmp_path / "dense"
    build_dense(make_config(moe, "single_expert", calib_dir, expert=2), str(out), OPTIONS)
    source = transformers.AutoModelForCausalLM.from_pretrained(moe)
    with safe_open(str(out / "model.safetensors"), "pt") as merged:
        for index, layer in enumerate(source.model.layers):
            experts = layer.mlp.experts
            size = experts.down_proj.shape[-1]
            prefix = f"model.layers.{index}.mlp"
            assert torch.equal(merged.get_tensor(f"{prefix}.gate_proj.weight"), experts.gate_up_proj[2, :size])
            assert torch.equal(merged.get_tensor(f"{prefix}.up_proj.weight"), experts.gate_up_proj[2, size:])
            assert torch.equal(merged.get_tensor(f"{prefix}.down_proj.weight"), experts.down_proj[2])
            q_proj = merged.get_tensor(f"model.layers.{index}.self_attn.q_proj.weight")
            assert torch.equal(q_proj, layer.self_attn.q_proj.weight)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_legacy_and_fused_layouts_agree(random_moe, calib_dir, tmp_path, method):
    outs = {}
    for layout, moe in random_moe.items():
        outs[layout] = tmp_path / layout
        build_dense(make_config(moe, method, calib_dir, **METHOD_PARAMS[method]), str(outs[layout]), OPTIONS)
    weights = [json.loads((out / WEIGHTS_FILE).read_text())["layers"] for out in outs.values()]
    torch.testing.assert_close(torch.tensor(weights[0]), torch.tensor(weights[1]), rtol=0, atol=1e-6)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(outs["legacy"], ids), logits_of(outs["fused"], ids), rtol=0, atol=1e-5)


def test_outputs_weights_stats_card_and_generates(random_moe, calib_dir, tmp_path):
    out = tmp_path / "dense"
    result = build_dense(make_config(random_moe["legacy"], "router_weighted", calib_dir), str(out), OPTIONS)
    payload = json.loads((out / WEIGHTS_FILE).read_text())
    assert len(payload["layers"]) == 2 and all(len(row) == 4 for row in payload["layers"])
    assert all(abs(sum(row) - 1) < 1e-9 and min(row) >= 0 for row in payload["layers"])
    assert (out / STATS_FILE).is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "router_weighted" in card and f"`{random_moe['legacy'].name}`" in card
    assert str(random_moe["legacy"]) not in card  # a published card names no local path
    assert result.statistics.tokens > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def merge", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    assert not list(tmp_path.glob("*.incomplete-*"))


def test_reused_statistics_skip_calibration(random_moe, calib_dir, tmp_path, monkeypatch):
    moe = random_moe["legacy"]
    first = tmp_path / "first"
    build_dense(make_config(moe, "router_weighted", calib_dir), str(first), OPTIONS)
    import mergekit_moe2dense.build as build

    monkeypatch.setattr(build, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    second = tmp_path / "second"
    config = make_config(moe, "router_weighted", calib_dir, aggregate="mean_prob", temperature=0.5)
    build_dense(config, str(second), OPTIONS, stats_path=str(first / STATS_FILE))
    assert (second / "model.safetensors").is_file()


def test_sharded_output_loads(random_moe, calib_dir, tmp_path):
    out = tmp_path / "dense"
    options = MergeOptions(quiet=True, out_shard_size=20_000)
    build_dense(make_config(random_moe["fused"], "expert_uniform", calib_dir), str(out), options)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(logits_of(out, ids)).all()


def test_interrupted_merge_leaves_no_complete_output(random_moe, calib_dir, tmp_path, monkeypatch):
    from mergekit_moe2dense.outputs import dense

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dense, "write_model_card", explode)  # the last file of the output
    out = tmp_path / "dense"
    with pytest.raises(KeyboardInterrupt):
        build_dense(make_config(random_moe["legacy"], "expert_uniform", calib_dir), str(out), OPTIONS)
    assert not out.exists() and not list(tmp_path.glob("dense.incomplete-*"))
    assert not (tmp_path / "dense.lock").exists()
