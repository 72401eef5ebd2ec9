# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Checkpoints with multi-token-prediction layers (DeepSeek-V3, GLM-4.5 as released): every output,
dense or a smaller MoE, leaves those layers out and its config.json says it has none."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import make_config
from mergekit_moe2dense.build import build_dense
from tiny_families import make_family_moe

OPTIONS = MergeOptions(quiet=True)
FAMILIES = ["deepseek_v3", "glm4_moe"]


def with_mtp_layer(moe):
    """The checkpoint as released: one multi-token-prediction layer stored after the last decoder
    layer, `model.layers.{num_hidden_layers}.*` (a whole MoE layer with all its experts, plus its
    projection and norms), and `num_nextn_predict_layers: 1`."""
    config = json.loads((moe / "config.json").read_text())
    last, hidden = config["num_hidden_layers"] - 1, config["hidden_size"]
    shard = moe / "model.safetensors"
    tensors = load_file(shard)
    mtp = f"model.layers.{last + 1}."
    layer = {
        mtp + name.split(".", 3)[3]: t.clone()
        for name, t in tensors.items()
        if name.startswith(f"model.layers.{last}.")
    }
    layer |= {mtp + "eh_proj.weight": torch.randn(hidden, 2 * hidden)}
    layer |= {mtp + norm: torch.ones(hidden) for norm in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")}
    assert any(".mlp.experts." in name for name in layer)
    save_file(tensors | layer, shard, metadata={"format": "pt"})
    (moe / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return moe


def stored_shapes(out) -> dict[str, list[int]]:
    shapes = {}
    for path in out.glob("model*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            shapes |= {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    return shapes


def loads_exactly(out):
    """The output's class loads every stored tensor, in its stored shape, and needs no other."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method,params",
    [
        ("prune_experts", {"num_experts": 2}),
        ("merge_experts", {"num_experts": 2}),
        ("kmeans_multi_dense", {"num_clusters": 2, "output": "moe"}),
    ],
)
def test_a_smaller_moe_has_no_mtp_layer_and_says_so(family, method, params, tokenizer_dir, calib_dir, tmp_path):
    """4 experts -> 2: the MTP layer's 4 experts are not carried into the 2-expert model (no
    statistics are recorded for a layer the model's forward never runs), so the layer is left out
    and `num_nextn_predict_layers` is 0: a loader's MTP decoding looks for no missing layer."""
    moe = with_mtp_layer(make_family_moe(family, tmp_path / "moe", tokenizer_dir))
    out = tmp_path / "smaller"
    build_dense(make_config(moe, method, calib_dir, **params), str(out), OPTIONS)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    shapes = stored_shapes(out)
    assert not [name for name in shapes if name.startswith("model.layers.3.")]
    experts = {int(m[1]) for name in shapes if (m := re.search(r"\.mlp\.experts\.(\d+)\.", name))}
    assert experts == {0, 1}
    assert all(shape[0] == 2 for name, shape in shapes.items() if name.endswith(".mlp.gate.weight"))
    assert loads_exactly(out).config.num_nextn_predict_layers == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dense_model_has_no_mtp_layer_and_says_so(family, tokenizer_dir, calib_dir, tmp_path):
    moe = with_mtp_layer(make_family_moe(family, tmp_path / "moe", tokenizer_dir))
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert not [name for name in stored_shapes(out) if name.startswith("model.layers.3.")]
    loads_exactly(out)
