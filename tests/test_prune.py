# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Smaller MoEs: `prune_experts` and `merge_experts` on tiny MoEs of every family."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import (
    assert_one_line_error,
    logits_of,
    make_config,
    make_mixtral,
    multimodal_text_logits,
    quantize_mxfp4_checkpoint,
    run_cli,
    save_dequantized,
    write_config,
)
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.families import UnsupportedModelError, get_family
from mergekit_moe2dense.methods import MethodError
from mergekit_moe2dense.methods.merge_experts import agglomerate, group_labels, router_similarity
from tiny_families import FAMILY_SPECS, MULTIMODAL_SPECS, make_family_moe, make_multimodal_moe

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def load(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("layout", ["legacy", "fused"])
@pytest.mark.parametrize("score", ["reap", "frequency", "contribution"])
def test_pruning_to_every_expert_reproduces_the_moe_exactly(random_moe, calib_dir, tmp_path, layout, score):
    moe, out = random_moe[layout], tmp_path / "pruned"
    result = build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=4, score=score), str(out), OPTIONS)
    model = load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (4, 2)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=0)
    assert result.layer_weights.shape == (4, 2, 4)
    record = json.loads((out / "expert_weights.json").read_text())
    assert record["groups"] == [[[0], [1], [2], [3]]] * 2


# Every family, in each checkpoint layout it has (GPT-OSS and Llama 4 have only the fused one,
# which is what save_pretrained writes: "legacy" is that layout)
FAMILIES = ["mixtral", *FAMILY_SPECS]
CASES = [
    (family, layout)
    for family in FAMILIES
    for layout in ("legacy", "fused")
    if layout == "legacy" or family == "mixtral" or len(get_family(FAMILY_SPECS[family][0]()).layouts) > 1
]


def family_moe(family, path, tokenizer_dir, layout="legacy", **values):
    if family == "mixtral":
        return make_mixtral(path, tokenizer_dir, layout=layout, seed=2, **values)
    return make_family_moe(family, path, tokenizer_dir, layout=layout, **values)


# one source layout per family (the fused one where there are two: read fused, written per expert);
# test_a_pruned_moe_of_every_family_loads_with_n_experts checks every written tensor of both layouts against the source's
@pytest.mark.parametrize(
    "family,layout", [(f, layout) for f, layout in CASES if (f, "fused") not in CASES or layout == "fused"]
)
def test_pruning_every_family_to_every_expert_reproduces_the_moe_exactly(
    family, layout, tokenizer_dir, calib_dir, tmp_path
):
    """The experts written back in the family's layout (per-expert tensors, or the fused [N, ...]
    tensors stacked), with every router row, router bias and correction bias: the same model."""
    moe, out = family_moe(family, tmp_path / "src", tokenizer_dir, layout), tmp_path / "pruned"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=4), str(out), OPTIONS)
    assert type(load(out)).__name__ == type(load(moe)).__name__
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=0)


def test_pruning_experts_never_routed_to_reproduces_the_moe(tokenizer_dir, calib_dir, tmp_path):
    """DeepSeek-V3 selects experts by score + correction bias: a very low bias on experts 2 and 3
    (group 1 of 2) means no token ever reaches them; keeping 0 and 1 changes nothing."""
    moe = make_family_moe("deepseek_v3", tmp_path / "src", tokenizer_dir)
    model = load(moe)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias[2:] = -1e4
    model.save_pretrained(moe)
    out = tmp_path / "pruned"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=2), str(out), OPTIONS)
    pruned = load(out)
    assert (pruned.config.n_routed_experts, pruned.config.n_group, pruned.config.topk_group) == (2, 1, 1)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)
    record = json.loads((out / "expert_weights.json").read_text())
    assert record["groups"] == [[[0], [1]]] * 2


@pytest.mark.parametrize("family,layout", CASES)
def test_a_pruned_moe_of_every_family_loads_with_n_experts(family, layout, tokenizer_dir, calib_dir, tmp_path):
    """2 of 4 experts, top-1: the family's class loads it with no missing, unexpected or mismatched
    key; config.json says 2 experts, top-1; every tensor is the original's, or, where it has an
    expert dim (experts, their biases, router rows and bias, correction biases, statistics), the
    kept experts' slices of it; shared experts and their gates unchanged."""
    moe = family_moe(family, tmp_path / "src", tokenizer_dir, layout)
    original = load(moe)
    out = tmp_path / "pruned"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=2, moe_top_k=1), str(out), OPTIONS)
    pruned = load(out)
    assert type(pruned).__name__ == type(original).__name__
    adapter, config = get_family(original.config), pruned.config
    assert (adapter.num_experts(config), adapter.top_k(config)) == (2, 1)
    assert all(getattr(config, key) == 1 for key in adapter.routing_groups or ())  # DeepSeek-style groups: one
    assert adapter.moe_layer_indices(config) == adapter.moe_layer_indices(original.config)
    kept = json.loads((out / "expert_weights.json").read_text())["groups"]
    sparse = adapter.moe_layer_indices(original.config)
    assert len(kept) == len(sparse) > 0
    old, new = original.state_dict(), pruned.state_dict()
    assert set(old) == set(new)
    indexed: dict[int, list[str]] = {}
    for name, value in old.items():
        if new[name].shape == value.shape:
            torch.testing.assert_close(new[name], value, rtol=0, atol=0, msg=name)
            continue
        axes = [d for d, (a, b) in enumerate(zip(value.shape, new[name].shape)) if a != b]
        assert len(axes) == 1 and (value.shape[axes[0]], new[name].shape[axes[0]]) == (4, 2), name
        layer = int(re.match(r"model\.layers\.(\d+)\.", name)[1])
        experts = torch.tensor([group[0] for group in kept[sparse.index(layer)]])
        torch.testing.assert_close(new[name], value.index_select(axes[0], experts), rtol=0, atol=0, msg=name)
        indexed.setdefault(layer, []).append(name)
    memory = adapter.memory_layout()
    biases = sum(bias is not None for bias in (memory.gate_up_bias, memory.down_bias))
    rows = sum("E" in shape for shape in adapter.extra_tensors.values())  # router biases, statistics
    assert sorted(indexed) == sparse
    assert all(len(names) == 3 + biases + rows for names in indexed.values()), indexed  # experts, router
    assert torch.isfinite(logits_of(out, IDS)).all()


def test_pruning_an_mxfp4_gpt_oss_gives_the_dequantized_moe_unquantized(tokenizer_dir, calib_dir, tmp_path):
    """GPT-OSS as released (MXFP4 experts), `output_quantization: none`: the kept experts are
    dequantized on read and stacked unquantized; config.json has no quantization_config; all 4
    kept: the dequantized MoE's logits."""
    moe = make_family_moe("gpt_oss", tmp_path / "moe", tokenizer_dir)
    quantized, reference = quantize_mxfp4_checkpoint(moe, tmp_path / "mxfp4")
    dequantized = save_dequantized(moe, tmp_path / "deq", reference)
    out = tmp_path / "pruned"
    config = make_config(quantized, "prune_experts", calib_dir, num_experts=4)
    build_dense(config.model_copy(update={"output_quantization": "none"}), str(out), OPTIONS)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not any(name.endswith(("_blocks", "_scales")) for name in handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.float32
    torch.testing.assert_close(logits_of(out, IDS), logits_of(dequantized, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prune_experts", "kmeans_multi_dense"])
def test_a_family_without_an_moe_class_refuses_a_smaller_moe_in_one_line(
    random_moe, calib_dir, tmp_path, monkeypatch, method
):
    import mergekit_moe2dense.families as families
    from mergekit_moe2dense.families.mixtral import MIXTRAL

    unnamed = dataclasses.replace(MIXTRAL, moe_architecture=None)
    monkeypatch.setattr(families, "FAMILIES", [unnamed if f is MIXTRAL else f for f in families.FAMILIES])
    params = {"num_experts": 2} if method == "prune_experts" else {"num_clusters": 2, "output": "moe"}
    with pytest.raises(UnsupportedModelError, match="rebuilding a smaller MoE") as error:
        build_dense(make_config(random_moe["legacy"], method, calib_dir, **params), str(tmp_path / "out"), OPTIONS)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_prune_parameters_are_checked_before_any_work(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    for params, message in (
        ({"num_experts": 5}, "num_experts=5 is out of range"),
        ({"num_experts": 2, "moe_top_k": 3}, "moe_top_k=3 is out of range"),
        ({"num_experts": 2, "refit": "scale"}, "not refit: scale"),
        ({"num_experts": 2, "score": "size"}, "score"),
    ):
        with pytest.raises(MethodError, match=message):
            build_dense(make_config(moe, "prune_experts", calib_dir, **params), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def permuted_copies(path, tokenizer_dir):
    """A tiny Mixtral whose experts are one expert with its hidden units in a different random
    order each: the same function, but averaging them unit by unit mixes unrelated units."""
    moe = make_mixtral(path, tokenizer_dir, identical=True, seed=3)
    model = load(moe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            width = experts.down_proj.shape[-1]
            for e in range(1, experts.gate_up_proj.shape[0]):
                order = torch.randperm(width, generator=generator)
                gate, up = experts.gate_up_proj[e, :width][order], experts.gate_up_proj[e, width:][order]
                experts.gate_up_proj[e] = torch.cat([gate, up])
                experts.down_proj[e] = experts.down_proj[e][:, order]
    model.save_pretrained(moe)
    return moe


@pytest.mark.parametrize("grouping", ["outputs", "router"])
def test_merging_groups_of_identical_experts_gives_the_moe(identical_moe, calib_dir, tmp_path, grouping):
    moe, out = identical_moe["fused"], tmp_path / "merged"
    config = make_config(moe, "merge_experts", calib_dir, num_experts=2, grouping=grouping, align="none")
    build_dense(config, str(out), OPTIONS)
    assert load(out).config.num_local_experts == 2
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)
    record = json.loads((out / "expert_weights.json").read_text())
    assert all(sorted(sum(layer, [])) == [0, 1, 2, 3] for layer in record["groups"])
    assert torch.tensor(record["experts"]).sum(-1).allclose(torch.ones(2, 2))


def same_router_rows(path):
    """Every router row (and router bias) of the saved MoE set to expert 0's: with identical experts,
    a group's closed-form row mix is that row again, so even a router that scales the experts'
    input (Llama 4) gives the merged MoE the MoE's output."""
    model = load(path)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if re.search(r"\.(router|gate)\.(weight|bias)$", name) and tensor.shape[0] == 4:
                tensor[:] = tensor[:1].clone()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "granitemoeshared"])
@pytest.mark.parametrize("align", ["none", "weights"])
def test_merging_identical_experts_of_fused_only_families_gives_the_moe(
    family, align, tokenizer_dir, calib_dir, tmp_path
):
    """Groups of identical experts merge into that expert, stacked into the fused tensors (GPT-OSS:
    transposed, interleaved, with biases; Llama 4: transposed, its router scaling the input;
    Granite: its hub names, a shared MLP beside the block); aligning identical experts keeps them."""
    moe = family_moe(family, tmp_path / "src", tokenizer_dir, identical=True)
    if family == "llama4_text":
        same_router_rows(moe)
    out = tmp_path / "merged"
    build_dense(make_config(moe, "merge_experts", calib_dir, num_experts=2, align=align), str(out), OPTIONS)
    assert get_family(load(out).config).num_experts(load(out).config) == 2
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)


def test_aligned_merges_of_permuted_gpt_oss_experts_give_the_moe(tokenizer_dir, calib_dir, tmp_path):
    """GPT-OSS's experts as one expert with its hidden units permuted (interleaved gate/up columns
    and their biases, down rows; the down bias has no units): weight alignment finds the orders
    through the fused layout's slices, and the merged groups are that expert again."""
    moe = family_moe("gpt_oss", tmp_path / "src", tokenizer_dir, identical=True)
    model = load(moe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            width = experts.down_proj.shape[1]
            for e in range(1, experts.gate_up_proj.shape[0]):
                order = torch.randperm(width, generator=generator)
                pairs = torch.stack([2 * order, 2 * order + 1], dim=1).reshape(-1)  # unit i: columns 2i, 2i + 1
                experts.gate_up_proj[e] = experts.gate_up_proj[e][:, pairs]
                experts.gate_up_proj_bias[e] = experts.gate_up_proj_bias[e][pairs]
                experts.down_proj[e] = experts.down_proj[e][order]
    model.save_pretrained(moe)
    reference = logits_of(moe, IDS)
    aligned, plain = tmp_path / "aligned", tmp_path / "plain"
    build_dense(make_config(moe, "merge_experts", calib_dir, num_experts=2, align="weights"), str(aligned), OPTIONS)
    build_dense(make_config(moe, "merge_experts", calib_dir, num_experts=2, align="none"), str(plain), OPTIONS)
    torch.testing.assert_close(logits_of(aligned, IDS), reference, rtol=0, atol=1e-4)
    assert (logits_of(plain, IDS) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("align", ["weights", "activations"])
def test_aligned_merges_of_permuted_copies_give_the_moe(tokenizer_dir, calib_dir, tmp_path, align):
    moe = permuted_copies(tmp_path / "src", tokenizer_dir)
    reference = logits_of(moe, IDS)
    for method, params in (("merge_experts", {"num_experts": 2}), ("expert_uniform", {}), ("router_weighted", {})):
        aligned, plain = tmp_path / f"{method}-aligned", tmp_path / f"{method}-plain"
        build_dense(make_config(moe, method, calib_dir, align=align, **params), str(aligned), OPTIONS)
        build_dense(make_config(moe, method, calib_dir, align="none", **params), str(plain), OPTIONS)
        torch.testing.assert_close(logits_of(aligned, IDS), reference, rtol=0, atol=1e-4)
        assert (logits_of(plain, IDS) - reference).abs().max() > 1e-2, method


# shared experts inside and beside the block, expert biases and a clamped SwiGLU, a router that
# scales the input, correction statistics [1, E]
REFIT_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text", "granitemoeshared", "ernie4_5_moe"]


@pytest.mark.parametrize("family", REFIT_FAMILIES)
def test_block_refit_lowers_each_pruned_blocks_error(family, tokenizer_dir, calib_dir, tmp_path):
    if family == "mixtral":
        moe = make_mixtral(tmp_path / "src", tokenizer_dir, seed=4)
    else:
        moe = make_family_moe(family, tmp_path / "src", tokenizer_dir)
    plain, fitted = tmp_path / "plain", tmp_path / "fitted"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=2), str(plain), OPTIONS)
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=2, refit="down_proj"), str(fitted), OPTIONS)
    errors = json.loads((fitted / "expert_weights.json").read_text())["refit_errors"]
    assert errors and all(after < before for before, after in errors.values()), errors
    # gate/up, routers and shared experts are the plain pruned model's; only the down projections moved
    ours, theirs = load(fitted).state_dict(), load(plain).state_dict()
    moved = {name for name in ours if not torch.equal(ours[name], theirs[name])}
    assert moved and all(name.endswith("experts.down_proj") for name in moved), moved


def test_block_refit_of_every_expert_keeps_the_moe(random_moe, calib_dir, tmp_path):
    moe, out = random_moe["legacy"], tmp_path / "fitted"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=4, refit="down_proj"), str(out), OPTIONS)
    errors = json.loads((out / "expert_weights.json").read_text())["refit_errors"]
    assert all(before < 1e-10 for before, _ in errors.values()), errors
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-4)


def brute_force_average_linkage(similarity, num_groups):
    groups = [[e] for e in range(similarity.shape[0])]
    while len(groups) > num_groups:
        pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
        a, b = max(pairs, key=lambda p: float(similarity[groups[p[0]]][:, groups[p[1]]].mean()))
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


def test_agglomerate_is_average_linkage_and_finds_separated_groups():
    generator = torch.Generator().manual_seed(0)
    for size, groups in ((8, 4), (12, 3), (6, 1), (5, 5)):
        x = torch.randn(size, 20, generator=generator, dtype=torch.float64)
        similarity = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        assert sorted(agglomerate(similarity, groups)) == brute_force_average_linkage(similarity, groups)
    centres = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    members = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2])
    points = centres[members] + 0.05 * torch.randn(8, 20, generator=generator, dtype=torch.float64)
    found = agglomerate(router_similarity(points.T), 3)  # 20 "tokens", correlation of 8 "experts"
    assert sorted(found) == sorted([[1, 3, 6], [2, 5], [0, 4, 7]])


def test_cli_writes_a_smaller_moe_and_refuses_bad_parameters_in_one_line(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "a.yml", random_moe["legacy"], calib_dir, "merge_experts", num_experts=3)
    result = run_cli(config, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "(merge_experts, 2 layers, 3 experts per layer)" in result.output
    assert load(tmp_path / "out").config.num_local_experts == 3
    bad = write_config(tmp_path / "b.yml", random_moe["legacy"], calib_dir, "prune_experts", num_experts=9)
    assert_one_line_error(run_cli(bad, tmp_path / "bad"), "num_experts=9 is out of range: the model has 4 experts")
    assert not (tmp_path / "bad").exists()


def test_a_fitted_router_routes_calibration_tokens_to_their_group(random_moe, calib_dir, tmp_path):
    from mergekit_moe2dense.calibration import RouterStatistics

    out = tmp_path / "merged"
    config = make_config(random_moe["legacy"], "merge_experts", calib_dir, num_experts=2, router="fitted")
    build_dense(config, str(out), OPTIONS)
    stats = RouterStatistics.load(out / "moe2dense" / "router_stats.safetensors")
    groups = json.loads((out / "expert_weights.json").read_text())["groups"]
    merged = load(out)
    for position, layer in enumerate(merged.model.layers):
        labels = group_labels(stats.samples[position], groups[position])
        routed = (stats.router_inputs[position] @ layer.mlp.gate.weight.T).argmax(-1)
        # a union of two experts' top-1 regions need not be linearly separable: well above chance
        majority = max((labels == j).mean() for j in range(2))
        assert (routed.numpy() == labels).mean() > max(0.8, majority + 0.1)


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL_SPECS))
def test_a_multimodal_checkpoint_prunes_to_its_text_moe(model_type, tokenizer_dir, calib_dir, tmp_path):
    """The smaller MoE of a multimodal checkpoint is its text model's (the vision tower left out,
    as in the dense conversion): pruned to every expert it gives the multimodal model's text
    logits; pruned to 2 it loads with 2 experts and no missing or unexpected key."""
    family = MULTIMODAL_SPECS[model_type][0]
    moe = make_multimodal_moe(model_type, tmp_path / "mm", tokenizer_dir)
    expected = multimodal_text_logits(moe, model_type, IDS)
    every = tmp_path / "every"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=4), str(every), OPTIONS)
    assert json.loads((every / "config.json").read_text())["model_type"] == family
    torch.testing.assert_close(logits_of(every, IDS), expected, rtol=0, atol=1e-5)
    two = tmp_path / "two"
    build_dense(make_config(moe, "prune_experts", calib_dir, num_experts=2, moe_top_k=1), str(two), OPTIONS)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(two, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert get_family(model.config).num_experts(model.config) == 2
    with safe_open(two / "model.safetensors", "pt") as f:
        assert not [n for n in f.keys() if "vision" in n or "visual" in n or "language_model" in n]
