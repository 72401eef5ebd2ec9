# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Expert selection by diversity (greedy log-det of the experts' output Gram matrix) and REAP's
full-softmax saliency: the math on constructed Gram matrices, then on tiny MoEs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import make_config, save_model
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.methods import MethodError
from mergekit_moe2dense.methods.prune_experts import expert_saliency, kept_experts
from mergekit_moe2dense.selection import (
    SelectionError,
    diverse_experts,
    diverse_selection,
    greedy_log_det,
    log_det,
    usage_weighted_gram,
)
from mergekit_moe2dense.statistics import STATS_FILE, RouterStatistics, StatisticsError

OPTIONS = MergeOptions(quiet=True)


def gram_of(outputs: torch.Tensor) -> torch.Tensor:
    """G_ij = sum_t <f_i(x_t), f_j(x_t)> of outputs [E, T, H]."""
    flat = outputs.double().reshape(outputs.shape[0], -1)
    return flat @ flat.T


def random_outputs(experts=6, tokens=5, hidden=4, seed=0) -> torch.Tensor:
    return torch.randn(experts, tokens, hidden, generator=torch.Generator().manual_seed(seed))


# -- the greedy on constructed Gram matrices ----------------------------------------------------
def test_duplicated_experts_are_never_both_chosen():
    outputs = random_outputs()
    outputs[3] = outputs[0]  # expert 3 is expert 0
    usage = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.3, 0.4])
    for count in range(2, 6):
        chosen = greedy_log_det(gram_of(outputs), count, usage)
        assert not {0, 3} <= set(chosen), (count, chosen)
        assert chosen[0] == 0  # the most used first


def test_a_rarely_used_but_distinct_expert_is_chosen():
    base = random_outputs(experts=1, seed=1)[0]
    outputs = torch.stack([base + 0.01 * random_outputs(experts=1, seed=s)[0] for s in range(2, 6)])
    distinct = random_outputs(experts=1, seed=9)[0]
    outputs = torch.cat([outputs, distinct[None]])  # expert 4: a direction of its own
    usage = torch.tensor([0.5, 0.45, 0.4, 0.35, 0.01])
    assert greedy_log_det(gram_of(outputs), 2, usage) == [0, 4]
    # usage order alone would not have it
    assert 4 not in usage.topk(2).indices.tolist()


def test_orthogonal_equal_norm_experts_come_in_usage_order():
    gram = 3.0 * torch.eye(6, dtype=torch.float64)
    usage = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.05, 0.3])
    assert greedy_log_det(gram, 6, usage) == usage.argsort(descending=True).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_each_greedy_step_is_the_best_by_brute_force(seed):
    outputs = random_outputs(experts=6, tokens=3, hidden=3, seed=seed)  # rank <= 9: every subset of 5 regular
    gram, usage = gram_of(outputs), torch.rand(6, generator=torch.Generator().manual_seed(seed))
    chosen = greedy_log_det(gram, 5, usage)
    for step in range(1, 5):
        best = max(log_det(gram, chosen[:step] + [e]) for e in range(6) if e not in chosen[:step])
        assert log_det(gram, chosen[: step + 1]) == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_the_greedy_equals_the_brute_force_best_set_on_well_separated_experts(seed):
    # near-orthogonal outputs of distinct norms: log det G[S, S] ~ sum of the log norms, so the
    # best set is the largest norms, which the greedy finds too (it starts from the most used)
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(12, 6, generator=generator, dtype=torch.float64))
    norms = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    outputs = (basis * norms).T + 1e-3 * torch.randn(6, 12, generator=generator, dtype=torch.float64)
    gram = outputs @ outputs.T
    for count in (2, 3, 4):
        best = max(itertools.combinations(range(6), count), key=lambda s: log_det(gram, list(s)))
        assert sorted(greedy_log_det(gram, count, gram.diagonal())) == list(best)


def test_the_greedy_matches_the_determinant_it_claims():
    gram = gram_of(random_outputs(seed=3))
    chosen = greedy_log_det(gram, 4, torch.ones(6))
    rows = torch.linalg.cholesky(gram[chosen][:, chosen])
    assert log_det(gram, chosen) == pytest.approx(float(2 * rows.diagonal().log().sum()))


def test_experts_in_the_span_of_the_chosen_ones_come_last_in_usage_order():
    outputs = random_outputs(experts=2, tokens=1, hidden=2, seed=4)
    outputs = torch.cat([outputs, outputs[:1] + outputs[1:], 2 * outputs[:1]])  # rank 2
    usage = torch.tensor([0.9, 0.8, 0.1, 0.5])
    assert greedy_log_det(gram_of(outputs), 4, usage) == [0, 1, 3, 2]


def test_usage_weighting_never_picks_an_unused_expert_for_its_diversity():
    outputs = random_outputs(experts=4, seed=5)
    usage = torch.tensor([0.6, 0.5, 0.9, 0.0])  # expert 3 distinct but never selected
    gram = gram_of(outputs)
    weighted = usage_weighted_gram(gram, usage)
    torch.testing.assert_close(weighted, gram_of(outputs * usage.double().sqrt()[:, None, None]))
    assert 3 not in greedy_log_det(weighted, 3, usage)


def test_layers_are_chosen_independently_and_too_many_is_refused():
    grams = torch.stack([gram_of(random_outputs(seed=s)) for s in range(3)])
    usage = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    chosen = diverse_experts(grams, usage, 3, weighted=False)
    assert chosen.shape == (3, 3)
    for layer in range(3):
        assert chosen[layer].tolist() == greedy_log_det(grams[layer], 3, usage[layer])
    with pytest.raises(SelectionError, match="cannot choose 7 of 6"):
        greedy_log_det(grams[0], 7, usage[0])


# -- statistics ---------------------------------------------------------------------------------
def statistics(gram=None) -> RouterStatistics:
    stats = RouterStatistics(layers=[0], num_experts=4, top_k=2, tokens=10)
    stats.selected[0] = torch.tensor([8.0, 6.0, 4.0, 2.0])
    stats.contribution_sum[0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    if gram is not None:
        stats.begin_expert_outputs()
        stats.output_gram[0] = gram
        stats.softmax_contribution_sum[0] = torch.tensor([1.0, 3.6, 2.0, 0.5])
    return stats


@pytest.mark.parametrize("score", ["diversity", "usage_diversity", "reap_softmax"])
def test_the_new_scores_refuse_statistics_without_the_gram_matrix(score):
    with pytest.raises(StatisticsError, match="no Gram matrix.*; recalibrate") as error:
        kept_experts(statistics(), score, 2) if score != "reap_softmax" else expert_saliency(statistics(), score)
    assert "\n" not in str(error.value)


def test_reap_softmax_is_the_softmax_sum_over_the_routed_tokens():
    stats = statistics(torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(
        expert_saliency(stats, "reap_softmax")[0], torch.tensor([1 / 8, 3.6 / 6, 2 / 4, 0.5 / 2]).double()
    )
    assert kept_experts(stats, "reap_softmax", 2) == [[1, 2]]


def test_the_gram_matrix_is_saved_only_when_recorded(tmp_path):
    stats = statistics()
    stats.save(tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        assert "output_gram" not in handle.keys() and "softmax_contribution_sum" not in handle.keys()
    gram = gram_of(random_outputs(experts=4))
    statistics(gram).save(tmp_path / "gram.safetensors")
    loaded = RouterStatistics.load(tmp_path / "gram.safetensors")
    torch.testing.assert_close(loaded.gram[0], gram)
    assert diverse_selection(loaded, "diversity", 2).tolist() == [
        greedy_log_det(gram, 2, loaded.selection_frequency[0])
    ]


# -- tiny MoEs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def duplicated_moe(random_moe, tokenizer_dir, tmp_path_factory):
    """The random tiny Mixtral with expert 1 of every layer a copy of expert 0."""
    model = transformers.AutoModelForCausalLM.from_pretrained(random_moe["legacy"], dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[1] = layer.mlp.experts.gate_up_proj[0]
            layer.mlp.experts.down_proj[1] = layer.mlp.experts.down_proj[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("duplicated") / "moe", "legacy")


def recorded(out) -> RouterStatistics:
    return RouterStatistics.load(out / STATS_FILE)


def test_calibration_records_the_gram_of_every_expert_on_the_sampled_tokens(duplicated_moe, calib_dir, tmp_path):
    config = make_config(duplicated_moe, "prune_experts", calib_dir, num_experts=2, score="diversity")
    config = config.model_copy(
        update={"calibration": config.calibration.model_copy(update={"record_router_inputs": True})}
    )
    build_dense(config, str(tmp_path / "out"), OPTIONS)
    stats = recorded(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(duplicated_moe, dtype=torch.float32)
    for position, layer in enumerate(stats.layers):
        x = stats.router_inputs[position]
        experts = model.model.layers[layer].mlp.experts
        index = torch.arange(4).repeat(x.shape[0]).reshape(-1, 1)
        with torch.no_grad():
            every = experts(x.repeat_interleave(4, dim=0), index, torch.ones(index.shape))
        expected = gram_of(every.view(x.shape[0], 4, -1).transpose(0, 1))
        torch.testing.assert_close(stats.gram[position], expected, rtol=1e-5, atol=1e-6)
        assert float(stats.gram[position, 0, 0]) == pytest.approx(float(stats.gram[position, 0, 1]))
        assert bool((stats.softmax_contribution_sum[position] > 0).all())
        assert bool((stats.reap_softmax_saliency[position] <= stats.reap_saliency[position] + 1e-12).all())


@pytest.mark.parametrize("score", ["diversity", "usage_diversity"])
def test_pruning_by_diversity_never_keeps_both_duplicated_experts(duplicated_moe, calib_dir, tmp_path, score):
    out = tmp_path / "out"
    build_dense(make_config(duplicated_moe, "prune_experts", calib_dir, num_experts=2, score=score), str(out), OPTIONS)
    groups = json.loads((out / "expert_weights.json").read_text())["groups"]
    for layer, kept in zip(groups, diverse_selection(recorded(out), score, 2).tolist()):
        members = [group[0] for group in layer]
        assert sorted(members) == sorted(kept)
        assert not {0, 1} <= set(members)


def test_concat_by_diversity_keeps_the_greedy_set(duplicated_moe, calib_dir, tmp_path):
    out = tmp_path / "out"
    result = build_dense(make_config(duplicated_moe, "concat", calib_dir, score="diversity"), str(out), OPTIONS)
    kept = diverse_selection(recorded(out), "diversity", 2)
    assert torch.equal((result.layer_weights > 0).nonzero()[:, 1].reshape(-1, 2), kept.sort(-1).values)
    assert not any({0, 1} <= set(row) for row in kept.tolist())


def test_default_runs_record_no_expert_outputs(random_moe, calib_dir, tmp_path):
    out = tmp_path / "out"
    build_dense(make_config(random_moe["legacy"], "prune_experts", calib_dir, num_experts=2), str(out), OPTIONS)
    with safe_open(str(out / STATS_FILE), framework="pt") as handle:
        assert set(handle.keys()).isdisjoint({"output_gram", "softmax_contribution_sum"})


def test_merge_experts_takes_reap_softmax_and_refuses_a_diversity_score(random_moe, calib_dir, tmp_path):
    out = tmp_path / "out"
    config = make_config(random_moe["legacy"], "merge_experts", calib_dir, num_experts=2, score="reap_softmax")
    build_dense(config, str(out), OPTIONS)
    assert recorded(out).output_gram is not None
    with pytest.raises(MethodError, match="score='diversity'.*selects a set of experts"):
        build_dense(
            make_config(random_moe["legacy"], "merge_experts", calib_dir, num_experts=2, score="diversity"),
            str(tmp_path / "refused"),
            OPTIONS,
        )
