# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""concat's per-layer budget: the spread split (against an independent computation), which
experts each layer keeps, and the zero-padded dense model it writes (on tiny Mixtrals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from mergekit.options import MergeOptions
from safetensors import safe_open

from helpers import logits_of, make_config
from mergekit_moe2dense.build import STATS_FILE, WEIGHTS_FILE, build_dense
from mergekit_moe2dense.methods import concat as concat_module
from mergekit_moe2dense.methods.concat import Concat
from mergekit_moe2dense.selection import SelectionError, greedy_log_det, spread_budget, usage_weighted_gram
from mergekit_moe2dense.statistics import RouterStatistics

OPTIONS = MergeOptions(quiet=True)
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
HIDDEN, EXPERT_WIDTH, NUM_EXPERTS = 32, 48, 4  # the tiny Mixtral of helpers.make_mixtral


# -- the split, against an independent computation --------------------------------------------
def effective_number(row: list[float]) -> float:
    """exp of the entropy of the normalised row."""
    mass = sum(row)
    return math.exp(-sum(w / mass * math.log(w / mass) for w in row if w > 0))


def reference_counts(frequency: list[list[float]], total: int) -> list[int]:
    """n_l = exp(entropy) in plain Python; the scale c of sum_l clip(c n_l, 1, E) = total by
    bisection; then largest remainder (ties: larger n_l, then the lower layer)."""
    cap = len(frequency[0])
    effective = [min(max(effective_number(row), 1.0), float(cap)) for row in frequency]

    def shares(c: float) -> list[float]:
        return [min(max(c * n, 1.0), float(cap)) for n in effective]

    low, high = 0.0, cap / min(effective)  # f(low) = L <= total <= L E = f(high)
    for _ in range(200):
        middle = (low + high) / 2
        if sum(shares(middle)) < total:
            low = middle
        else:
            high = middle
    share = shares((low + high) / 2)
    counts = [min(max(math.floor(s), 1), cap) for s in share]
    order = sorted(range(len(share)), key=lambda i: (-(share[i] - counts[i]), -effective[i], i))
    left = total - sum(counts)
    for layer in order:
        if left and counts[layer] < cap:
            counts[layer] += 1
            left -= 1
    assert left == 0
    return counts


def random_case(seed: int) -> tuple[torch.Tensor, int]:
    """Selection frequencies [L, E] from flat to one-hot (some experts never selected), and a
    total in L..L E (its ends included)."""
    generator = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 7, (1,), generator=generator))
    experts = int(torch.randint(2, 13, (1,), generator=generator))
    power = torch.rand(layers, 1, generator=generator, dtype=torch.float64) * 12  # large: concentrated
    frequency = torch.rand(layers, experts, generator=generator, dtype=torch.float64) ** power
    frequency *= torch.rand(layers, experts, generator=generator) > 0.25
    frequency[:, 0] += 1e-3  # at least one selected expert in each layer
    total = [layers, layers * experts, int(torch.randint(layers, layers * experts + 1, (1,), generator=generator))]
    return frequency, total[seed % 5] if seed % 5 < 2 else total[2]


@pytest.mark.parametrize("seed", range(40))
def test_spread_counts_sum_to_the_total_within_one_to_e_and_match_a_bisection(seed):
    frequency, total = random_case(seed)
    layers, experts = frequency.shape
    counts = spread_budget(frequency, total)
    assert len(counts) == layers and all(isinstance(c, int) for c in counts)
    assert sum(counts) == total
    assert all(1 <= c <= experts for c in counts)
    assert counts == reference_counts(frequency.tolist(), total)
    # a layer whose routing is more spread never keeps fewer experts
    effective = [effective_number(row) for row in frequency.tolist()]
    for a in range(layers):
        for b in range(layers):
            if effective[a] > effective[b] + 1e-9:
                assert counts[a] >= counts[b], (effective, counts)


UNIFORM4, PAIR4, ONE4 = [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]


@pytest.mark.parametrize(
    "frequency, total, expected",
    [
        ([UNIFORM4, PAIR4], 4, [3, 1]),  # n = 4, 2: c = 2/3, shares 8/3 and 4/3
        ([PAIR4, UNIFORM4], 4, [1, 3]),  # the same, layers swapped
        ([UNIFORM4, PAIR4], 6, [4, 2]),  # c = 1: exact shares
        ([ONE4, UNIFORM4], 4, [1, 3]),  # n = 1 held at 1, the rest to the other layer
        ([UNIFORM4, ONE4, ONE4], 6, [4, 1, 1]),  # c = 1: the first at E, the others at 1
        ([UNIFORM4, ONE4, [0, 0, 3, 0]], 8, [4, 2, 2]),  # the first held at E passes its share on: c = 2
        ([PAIR4, PAIR4, PAIR4], 7, [3, 2, 2]),  # equal remainders, equal n: the lower layer
        ([[5, 3, 2, 0], [5, 3, 2, 0]], 5, [3, 2]),
        ([UNIFORM4, PAIR4], 2, [1, 1]),  # total L: one each
        ([UNIFORM4, PAIR4], 8, [4, 4]),  # total L E: every expert
    ],
)
def test_spread_splits_hand_made_frequencies_exactly(frequency, total, expected):
    assert spread_budget(torch.tensor(frequency, dtype=torch.float64), total) == expected


def test_spread_split_of_unnormalised_frequencies_is_that_of_the_normalised_ones():
    frequency = torch.tensor(
        [[40.0, 30.0, 20.0, 10.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 1.0, 0, 0, 0, 0]]
    )
    normalised = frequency / frequency.sum(-1, keepdim=True)
    for total in range(3, 19):
        assert spread_budget(frequency, total) == spread_budget(normalised, total)


@pytest.mark.parametrize("total", [0, 2, 13, 100])
def test_totals_below_l_or_above_l_times_e_are_refused(total):
    frequency = torch.tensor([UNIFORM4, PAIR4, ONE4], dtype=torch.float64)  # L = 3, E = 4: 3..12
    with pytest.raises(SelectionError, match=f"cannot keep {total} experts in 3 layers of 4"):
        spread_budget(frequency, total)
    assert spread_budget(frequency, 3) == [1, 1, 1] and spread_budget(frequency, 12) == [4, 4, 4]


# -- which experts each layer keeps (constructed statistics) ----------------------------------
def constructed_statistics() -> RouterStatistics:
    """Three MoE layers of 6 experts: routing concentrated (layer 0), flat (1), between (2).
    Contributions rank the experts otherwise than frequencies; in each layer the second most
    selected expert's outputs are a copy of the most selected one's."""
    stats = RouterStatistics(layers=[1, 3, 5], num_experts=6, top_k=2, tokens=100)
    stats.selected[:] = torch.tensor(
        [[120, 70, 6, 3, 1, 0], [36, 35, 34, 33, 32, 30], [60, 50, 40, 30, 15, 5]], dtype=torch.float64
    )
    stats.gate_sum[:] = stats.selected * torch.linspace(0.3, 0.6, 6, dtype=torch.float64)
    stats.contribution_sum[:] = torch.tensor(
        [[1, 6, 3, 5, 2, 4], [6, 1, 5, 2, 4, 3], [2, 3, 6, 1, 5, 4]], dtype=torch.float64
    )
    stats.begin_expert_outputs()
    generator = torch.Generator().manual_seed(0)
    for position in range(3):
        outputs = torch.randn(6, 7, 4, generator=generator, dtype=torch.float64)
        first, second = stats.selected[position].argsort(descending=True)[:2].tolist()
        outputs[second] = outputs[first]
        flat = outputs.reshape(6, -1)
        stats.output_gram[position] = flat @ flat.T
    return stats


def best_first(score: torch.Tensor, count: int) -> list[int]:
    return sorted(range(len(score)), key=lambda e: -float(score[e]))[:count]


def test_uniform_routing_keeps_more_experts_than_concentrated_routing():
    stats = RouterStatistics(layers=[0, 1, 2], num_experts=8, top_k=2, tokens=100)
    stats.selected[:] = torch.tensor(
        [[100, 100, 0, 0, 0, 0, 0, 0], [25] * 8, [50, 50, 25, 25, 25, 25, 0, 0]], dtype=torch.float64
    )
    for m in (2, 3, 4):
        params = Concat.Parameters(num_experts=m, score="frequency", budget="spread")
        counts = [len(experts) for experts in Concat().select(stats, params, 3).experts]
        assert sum(counts) == 3 * m
        assert counts[1] > counts[2] > counts[0], (m, counts)  # flat > between > concentrated
        uniform = Concat.Parameters(num_experts=m, score="frequency")
        assert [len(e) for e in Concat().select(stats, uniform, 3).experts] == [m] * 3


def test_more_experts_than_the_layers_hold_are_refused_with_a_spread_budget():
    params = Concat.Parameters(num_experts=7, score="frequency", budget="spread")
    with pytest.raises(SelectionError, match="cannot keep 21 experts in 3 layers of 6"):
        Concat().select(constructed_statistics(), params, 3)


@pytest.mark.parametrize("score", ["contribution", "frequency", "diversity", "usage_diversity"])
@pytest.mark.parametrize("gates", ["mean", "equal"])
def test_each_score_keeps_its_best_experts_per_layer_with_the_spread_counts(score, gates):
    stats = constructed_statistics()
    frequency = stats.selection_frequency
    counts = spread_budget(frequency, 2 * 3)
    assert len(set(counts)) > 1, counts  # the layers do keep different numbers
    params = Concat.Parameters(num_experts=2, score=score, gates=gates, budget="spread")
    selection = Concat().select(stats, params, 3)
    assert [len(experts) for experts in selection.experts] == counts
    for position, (experts, count) in enumerate(zip(selection.experts, counts)):
        if score == "contribution":
            expected = best_first(stats.contribution_sum[position], count)
        elif score == "frequency":
            expected = best_first(stats.selected[position], count)
        else:
            gram = stats.output_gram[position]
            if score == "usage_diversity":
                gram = usage_weighted_gram(gram, frequency[position])
            expected = greedy_log_det(gram, count, frequency[position])
            first, second = best_first(stats.selected[position], 2)
            assert not {first, second} <= set(experts)  # the copy is never kept with its original
        assert list(experts) == expected, (position, experts, expected)
        want = 1.0 / count if gates == "equal" else stats.mean_gate[position, list(experts)]
        torch.testing.assert_close(selection.gates[position], torch.as_tensor(want, dtype=torch.float64).expand(count))


# -- the dense model, on tiny Mixtrals ---------------------------------------------------------
def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def expert_tensor(moe, layer: int, expert: int, name: str) -> torch.Tensor:
    with safe_open(str(moe / "model.safetensors"), "pt") as handle:
        return handle.get_tensor(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight")


def kept_experts(result) -> list[list[int]]:
    return [torch.nonzero(row > 0).flatten().tolist() for row in result.layer_weights]


def per_layer_fixed_gate_logits(path, ids, kept, gates) -> torch.Tensor:
    """The MoE with each layer's router replaced by fixed gates over that layer's kept experts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layer, experts, weights in zip(model.model.layers, kept, gates, strict=True):
        index = torch.tensor(experts, dtype=torch.long)
        weight = torch.tensor(weights, dtype=torch.float32)

        def router(hidden, index=index, weight=weight):
            tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            return torch.zeros(tokens, NUM_EXPERTS), weight.expand(tokens, -1), index.expand(tokens, -1)

        layer.mlp.gate.forward = router
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_padding_is_zero(tensors: dict[str, torch.Tensor], layer: int, width: int) -> None:
    prefix = f"model.layers.{layer}.mlp."
    for name in ("gate_proj", "up_proj"):
        assert torch.count_nonzero(tensors[prefix + name + ".weight"][width:]) == 0, name
    assert torch.count_nonzero(tensors[prefix + "down_proj.weight"][:, width:]) == 0


@pytest.fixture(scope="module")
def uniform_run(random_moe, calib_dir, tmp_path_factory):
    """concat m = 2 with `budget: uniform` on the random tiny Mixtral, and its statistics."""
    out = tmp_path_factory.mktemp("uniform") / "dense"
    result = build_dense(
        make_config(
            random_moe["legacy"],
            "concat",
            calib_dir,
            num_experts=2,
            score="contribution",
            gates="equal",
            budget="uniform",
        ),
        str(out),
        OPTIONS,
    )
    return out, result


@pytest.fixture(scope="module")
def skewed_stats(uniform_run, tmp_path_factory):
    """The uniform run's statistics with layer 0's routing on one expert (n = 1) and layer 1's
    flat (n = 4): a spread split of 2 x 2 experts is [1, 3]."""
    stats = RouterStatistics.load(uniform_run[0] / STATS_FILE)
    stats.selected[0] = torch.tensor([2.0 * stats.tokens, 0, 0, 0], dtype=torch.float64)
    stats.selected[1] = torch.full((NUM_EXPERTS,), stats.tokens / 2, dtype=torch.float64)
    assert spread_budget(stats.selection_frequency, 4) == [1, 3]
    path = tmp_path_factory.mktemp("skewed") / "stats.safetensors"
    stats.save(path)
    return path


def test_uniform_budget_is_the_concatenation_of_the_chosen_experts_and_the_default(
    random_moe, calib_dir, tmp_path, uniform_run
):
    moe = random_moe["legacy"]
    out, result = uniform_run
    tensors = tensors_of(out)
    kept = kept_experts(result)
    assert kept == [sorted(e) for e in result.statistics.mean_contribution.topk(2, dim=-1).indices.tolist()]
    for layer, experts in enumerate(kept):
        order = result.statistics.mean_contribution[layer].topk(2).indices.tolist()  # best first
        assert sorted(order) == experts
        prefix = f"model.layers.{layer}.mlp."
        expected = {
            "gate_proj": torch.cat([expert_tensor(moe, layer, e, "w1") for e in order]),
            "up_proj": torch.cat([expert_tensor(moe, layer, e, "w3") for e in order]),
            "down_proj": torch.cat([0.5 * expert_tensor(moe, layer, e, "w2") for e in order], dim=1),
        }
        for name, value in expected.items():
            assert torch.equal(tensors[prefix + name + ".weight"], value), (layer, name)
    default = tmp_path / "default"
    build_dense(
        make_config(moe, "concat", calib_dir, num_experts=2, score="contribution", gates="equal"), str(default), OPTIONS
    )
    others = tensors_of(default)
    assert tensors.keys() == others.keys() and all(torch.equal(tensors[k], others[k]) for k in tensors)
    weights = json.loads((out / WEIGHTS_FILE).read_text())
    assert weights["layers"] == json.loads((default / WEIGHTS_FILE).read_text())["layers"]
    assert "mlp_widths" not in weights and "mlp_parameters_on_disk" not in weights
    assert "mlp_widths" not in (out / "README.md").read_text()
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 2 * EXPERT_WIDTH


def test_spread_split_of_different_widths_is_the_fixed_gate_moe_zero_padded(
    random_moe, calib_dir, tmp_path, skewed_stats
):
    moe = random_moe["legacy"]
    out = tmp_path / "dense"
    config = make_config(moe, "concat", calib_dir, num_experts=2, score="contribution", budget="spread")  # gates: mean
    result = build_dense(config, str(out), OPTIONS, stats_path=str(skewed_stats))
    stats = result.statistics
    kept = kept_experts(result)
    assert [len(e) for e in kept] == [1, 3]
    assert kept == [sorted(best_first(stats.mean_contribution[i], c)) for i, c in enumerate([1, 3])]
    gates = [stats.mean_gate[i, experts].tolist() for i, experts in enumerate(kept)]

    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "MistralForCausalLM"
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 3 * EXPERT_WIDTH
    expected = per_layer_fixed_gate_logits(moe, IDS, kept, gates)
    torch.testing.assert_close(logits_of(out, IDS), expected, rtol=0, atol=1e-5)
    assert (logits_of(moe, IDS) - expected).abs().max() > 1e-2  # the fixed gates do change the model

    tensors = tensors_of(out)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (3 * EXPERT_WIDTH, HIDDEN)
    assert_padding_is_zero(tensors, 0, EXPERT_WIDTH)
    (expert,) = kept[0]
    assert torch.equal(
        tensors["model.layers.0.mlp.gate_proj.weight"][:EXPERT_WIDTH], expert_tensor(moe, 0, expert, "w1")
    )
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"][:EXPERT_WIDTH], expert_tensor(moe, 0, expert, "w3"))
    assert torch.count_nonzero(tensors["model.layers.1.mlp.gate_proj.weight"].abs().sum(-1)) == 3 * EXPERT_WIDTH

    weights = json.loads((out / WEIGHTS_FILE).read_text())
    assert weights["mlp_widths"] == [EXPERT_WIDTH, 3 * EXPERT_WIDTH]
    assert weights["mlp_parameters_on_disk"] == 3 * HIDDEN * 3 * EXPERT_WIDTH * 2
    assert weights["mlp_parameters_effective"] == 3 * HIDDEN * 4 * EXPERT_WIDTH
    assert [sum(w > 0 for w in row) for row in weights["layers"]] == [1, 3]
    card = (out / "README.md").read_text()
    for key in ("mlp_widths", "mlp_parameters_on_disk", "mlp_parameters_effective"):
        assert f"- {key}: `{weights[key]}`" in card


def test_identical_experts_with_a_spread_split_give_the_moe_logits(identical_moe, calib_dir, tmp_path, monkeypatch):
    calls = []

    def split(frequency, total):
        calls.append((tuple(frequency.shape), total))
        return [1, 3]

    monkeypatch.setattr(concat_module, "spread_budget", split)
    moe = identical_moe["fused"]
    out = tmp_path / "dense"
    config = make_config(moe, "concat", calib_dir, num_experts=2, score="contribution", gates="equal", budget="spread")
    build_dense(config, str(out), OPTIONS)
    assert calls and set(calls) == {((2, NUM_EXPERTS), 4)}
    assert json.loads((out / WEIGHTS_FILE).read_text())["mlp_widths"] == [EXPERT_WIDTH, 3 * EXPERT_WIDTH]
    assert_padding_is_zero(tensors_of(out), 0, EXPERT_WIDTH)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)


def test_down_proj_refit_on_a_spread_budget_keeps_the_padding_zero(random_moe, calib_dir, tmp_path, skewed_stats):
    moe = random_moe["legacy"]
    outs, tensors = {}, {}
    for refit in ("none", "down_proj"):
        outs[refit] = tmp_path / refit
        config = make_config(
            moe, "concat", calib_dir, num_experts=2, score="contribution", budget="spread", refit=refit
        )
        build_dense(config, str(outs[refit]), OPTIONS, stats_path=str(skewed_stats))
        tensors[refit] = tensors_of(outs[refit])
        assert_padding_is_zero(tensors[refit], 0, EXPERT_WIDTH)
    down = "model.layers.0.mlp.down_proj.weight"
    fitted, plain = tensors["down_proj"][down], tensors["none"][down]
    assert fitted.shape == (HIDDEN, 3 * EXPERT_WIDTH)
    assert (fitted[:, :EXPERT_WIDTH] - plain[:, :EXPERT_WIDTH]).abs().max() > 1e-4  # it was re-fitted
    assert json.loads((outs["down_proj"] / WEIGHTS_FILE).read_text())["mlp_widths"] == [EXPERT_WIDTH, 3 * EXPERT_WIDTH]
    assert bool(torch.isfinite(logits_of(outs["down_proj"], IDS)).all())


def test_remainders_equal_on_paper_go_to_the_layer_with_more_effective_experts():
    """Shares 1.5 and 4.5 tie; exp(entropy) of six equal experts is 6 only to rounding."""
    frequency = torch.zeros(2, 8)
    frequency[0, :2], frequency[1, :6] = 1.0, 1.0
    assert spread_budget(frequency, 6) == [1, 5]
