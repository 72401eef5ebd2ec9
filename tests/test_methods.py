# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Method weights on synthetic router statistics: properties a wrong formula breaks."""

from __future__ import annotations

import mergekit.merge_methods as mergekit_methods
import pydantic
import pytest
import torch
import transformers

from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.families.mixtral import MIXTRAL
from mergekit_moe2dense.methods import (
    ADAPTERS,
    METHODS,
    MethodError,
    MethodParameters,
    MethodPlan,
    get_method,
    register,
    register_methods,
)
from mergekit_moe2dense.methods import concat as concat_module
from mergekit_moe2dense.methods.kernel import weighted_sum
from mergekit_moe2dense.methods.router_weighted import RouterWeighted
from mergekit_moe2dense.methods.top_k_tempered import tempered_top_k
from mergekit_moe2dense.plan import single_block_plans, with_family_scales
from mergekit_moe2dense.statistics import RouterStatistics

E, L, K = 6, 3, 2


def synthetic_stats(tokens: int = 500, seed: int = 0) -> RouterStatistics:
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(L, 1, E, generator=generator) * 2
    logits = bias + torch.randn(L, tokens, E, generator=generator)
    stats = RouterStatistics(layers=list(range(L)), num_experts=E, top_k=K, samples=torch.zeros(L, tokens, E))
    keep = torch.ones(tokens, dtype=torch.bool)
    for layer in range(L):
        probs = torch.softmax(logits[layer], -1)
        top = probs.topk(K, -1)
        stats.update(
            layer,
            logits[layer],
            top.values / top.values.sum(-1, keepdim=True),
            top.indices,
            keep,
            torch.arange(tokens),
            torch.arange(tokens),
        )
    stats.tokens = tokens
    return stats


def fake_layers(num_layers: int = L, num_experts: int = E):
    """MoE layers with no checkpoint behind them: enough for a method's plan."""
    return [
        MoELayer(index=i, experts=tuple({} for _ in range(num_experts)), router="", consumed=())
        for i in range(num_layers)
    ]


def plan(name, stats=None, **params):
    method = get_method(name)
    resolved = method.resolve_parameters(params, num_experts=E, top_k=K)
    return method.plan(stats or synthetic_stats(), resolved, fake_layers())


def weights(name, stats=None, **params):
    return plan(name, stats, **params).weights


CASES = (
    [("router_weighted", {"aggregate": a}) for a in ("mean_logit", "mean_prob", "median_prob", "selection_frequency")]
    + [
        ("top_k_tempered", {"aggregate": a, "temperature": t, "top_k": k, "renormalize": r})
        for a in ("mean", "median")
        for t in (0.1, 1.0)
        for k in (1, 2, E)
        for r in (True, False)
    ]
    + [("expert_uniform", {}), ("single_expert", {}), ("single_expert", {"expert": 3})]
)


@pytest.mark.parametrize("name,params", CASES)
def test_weights_are_a_distribution_per_layer(name, params):
    w = weights(name, **params)
    assert w.shape == (L, E)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(L, dtype=w.dtype))


def test_mean_logit_is_softmax_of_mean_not_of_sum():
    stats = synthetic_stats()
    w = weights("router_weighted", stats, aggregate="mean_logit", temperature=2.0)
    expected = torch.softmax(stats.samples.double().mean(1) / 2.0, -1)
    torch.testing.assert_close(w, expected)
    assert (w.max(-1).values < 0.999).all(), "softmax of summed logits would be one-hot"


def test_mean_prob_at_temperature_one_is_the_normalised_mean():
    stats = synthetic_stats()
    w = weights("router_weighted", stats, aggregate="mean_prob")
    mean = torch.softmax(stats.samples.double(), -1).mean(1)
    torch.testing.assert_close(w, mean / mean.sum(-1, keepdim=True))


@pytest.mark.parametrize("aggregate", ["mean_logit", "mean_prob", "selection_frequency"])
def test_router_weighted_temperature_to_zero_is_one_hot(aggregate):
    assert (weights("router_weighted", aggregate=aggregate, temperature=1e-4).max(-1).values > 0.999).all()


def test_top_k_tempered_temperature_to_zero_counts_top1_choices():
    # Per token the tempered softmax becomes one-hot on its top-1 expert.
    hot = weights("top_k_tempered", temperature=1e-3)
    top1 = torch.nn.functional.one_hot(synthetic_stats().samples.argmax(-1), E).double().mean(1)
    torch.testing.assert_close(hot, top1, atol=1e-3, rtol=0)


def test_large_temperature_approaches_uniform():
    w = weights("router_weighted", aggregate="mean_logit", temperature=1e6)
    torch.testing.assert_close(w, torch.full((L, E), 1 / E, dtype=w.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4, E])
def test_top_k_mask_keeps_exactly_k_per_token(k):
    logits = torch.randn(50, E)
    probs = tempered_top_k(logits, 0.7, k, renormalize=False)
    assert ((probs > 0).sum(-1) == k).all()
    renormalized = tempered_top_k(logits, 0.7, k, renormalize=True)
    torch.testing.assert_close(renormalized.sum(-1), torch.ones(50, dtype=renormalized.dtype))


def test_median_never_all_zero():
    # 6 experts, top-1, balanced routing: every expert's median is zero.
    stats = synthetic_stats()
    stats.samples = torch.randn(L, 600, E) * 0.01
    for layer in range(L):
        stats.samples[layer, torch.arange(600), torch.arange(600) % E] += 5.0
    w = weights("top_k_tempered", stats, top_k=1, aggregate="median")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, weights("top_k_tempered", stats, top_k=1, aggregate="mean"))


def test_single_expert_defaults_to_most_selected():
    stats = synthetic_stats()
    w = weights("single_expert", stats)
    assert (w.argmax(-1) == stats.selection_frequency.argmax(-1)).all()
    assert (w.max(-1).values == 1).all()


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("router_weighted", {"temperature": 0}, "temperature"),
        ("router_weighted", {"temperature": -1.0}, "temperature"),
        ("top_k_tempered", {"temperature": 0.0}, "temperature"),
        ("top_k_tempered", {"top_k": 0}, "top_k"),
        ("top_k_tempered", {"top_k": E + 1}, "out of range"),
        ("router_weighted", {"aggregate": "sum_logit"}, "aggregate"),
        ("router_weighted", {"temprature": 1.0}, "unknown parameter"),
        ("single_expert", {"expert": E}, "out of range"),
    ],
)
def test_bad_parameters_are_rejected(name, params, message):
    with pytest.raises(MethodError, match=message):
        get_method(name).resolve_parameters(params, num_experts=E, top_k=K)


def test_unknown_method():
    with pytest.raises(MethodError, match="unknown merge_method"):
        get_method("slerp_experts")


def test_registration_is_idempotent_and_visible_to_mergekit():
    register_methods()
    register_methods()
    for name, method in METHODS.items():
        adapter = mergekit_methods.get(name)
        assert adapter is ADAPTERS[name] and adapter.method is method
        assert adapter.spec.pretty_name == method.pretty_name


def test_registry_refuses_a_second_method_of_the_same_name():
    original = METHODS["router_weighted"]
    with pytest.raises(MethodError, match="'router_weighted' is already registered"):
        register(RouterWeighted())
    assert METHODS["router_weighted"] is original

    class Renamed(RouterWeighted):
        name = "router_weighted_copy"

    try:
        assert register(Renamed()) is METHODS["router_weighted_copy"]
        with pytest.raises(MethodError, match="already registered"):
            register(Renamed())
    finally:
        METHODS.pop("router_weighted_copy", None)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameters_are_frozen_strict_models_with_the_refit_options(name):
    method = METHODS[name]
    assert issubclass(method.Parameters, MethodParameters)
    assert method.Parameters.model_config["extra"] == "forbid"
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        method.Parameters(bogus=1)
    accepted = sorted(method.Parameters.model_fields)
    assert {"refit", "refit_damping", "refit_gate_up"} <= set(accepted)
    with pytest.raises(
        MethodError, match=f"unknown parameter\\(s\\) for {name}: bogus; accepted: {', '.join(accepted)}$"
    ):
        method.resolve_parameters({"bogus": 1}, num_experts=E, top_k=K)
    params = method.resolve_parameters({"refit": "down_proj"}, num_experts=E, top_k=K)
    assert isinstance(params, method.Parameters) and params.refit == "down_proj" and params.needs_refit
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        params.refit = "none"
    with pytest.raises(MethodError, match=f"{name}: parameter refit_damping=0: "):
        method.resolve_parameters({"refit_damping": 0}, num_experts=E, top_k=K)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mergekit_spec_is_derived_from_the_parameters(name):
    fields = METHODS[name].Parameters.model_fields
    specs = {spec.name: spec for spec in ADAPTERS[name].spec.parameters}
    assert list(specs) == list(fields)  # no fake per-input `expert_weight`
    for field_name, field in fields.items():
        assert specs[field_name].default == field.default
        assert specs[field_name].validate(field.default) == field.default
    with pytest.raises(pydantic.ValidationError):
        specs["refit_damping"].validate(-1.0)  # constraints travel with the type


def test_mergekit_spec_validates_like_our_model():
    spec = {p.name: p for p in ADAPTERS["router_weighted"].spec.parameters}
    assert spec["temperature"].validate(2) == 2.0
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(pydantic.ValidationError):
            spec["temperature"].validate(bad)
    with pytest.raises(pydantic.ValidationError):
        spec["aggregate"].validate("sum_logit")


def test_model_dependent_defaults_give_a_new_object():
    method = get_method("top_k_tempered")
    assert method.Parameters().top_k is None
    params = method.resolve_parameters({}, num_experts=E, top_k=K)
    assert params.top_k == K and method.Parameters().top_k is None
    assert get_method("concat").resolve_parameters({}, num_experts=E, top_k=K).num_experts == K


def test_recorded_parameters_keep_their_layout():
    """expert_weights.json and the card list the method's parameters, then the re-fit ones."""
    params = get_method("router_weighted").resolve_parameters({"temperature": 2}, num_experts=E, top_k=K)
    assert params.model_dump(mode="json") == {
        "aggregate": "mean_logit",
        "temperature": 2.0,
        "align": "none",
        "refit": "down_proj",
        "refit_damping": 1e-4,
        "refit_gate_up": "merge",
    }
    assert list(params.model_dump(mode="json")) == [
        "aggregate",
        "temperature",
        "align",
        "refit",
        "refit_damping",
        "refit_gate_up",
    ]
    fixed = get_method("max_contribution").resolve_parameters({}, num_experts=E, top_k=K).model_dump(mode="json")
    assert list(fixed) == ["score", "refit", "refit_damping", "refit_gate_up", "num_experts", "gates"]
    assert (fixed["refit"], fixed["num_experts"], fixed["gates"]) == ("down_proj", 1, "mean")


def test_max_contribution_keeps_one_expert_whatever_is_asked():
    with pytest.raises(MethodError, match="unknown parameter.*num_experts"):
        get_method("max_contribution").resolve_parameters({"num_experts": 2}, num_experts=E, top_k=K)


def stats_with_contributions(seed: int = 0) -> RouterStatistics:
    stats = synthetic_stats(seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    stats.contribution_sum = torch.rand(L, E, generator=generator, dtype=torch.float64) * stats.tokens
    return stats


@pytest.mark.parametrize("params", [{}, {"num_experts": 3, "gates": "equal"}, {"num_experts": E, "score": "frequency"}])
def test_concat_weights_and_plans_come_from_one_selection(params, monkeypatch):
    calls = []
    original = concat_module.top_experts

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(concat_module, "top_experts", counted)
    stats = stats_with_contributions()
    result = plan("concat", stats, **params)
    assert len(calls) == 1
    m = params.get("num_experts", K)
    expected = concat_module.expert_scores(stats, params.get("score", "contribution")).topk(m, dim=-1).indices
    for position, (row, layer_plan, kept) in enumerate(zip(result.weights, result.layers, expected.tolist())):
        experts = [block.weights.index(1.0) for block in layer_plan.blocks]
        assert experts == kept  # best first
        assert sorted(row.nonzero().flatten().tolist()) == sorted(experts)
        if params.get("gates") == "equal":  # 1/m of the mixture each
            assert [block.fixed_gate for block in layer_plan.blocks] == [None] * m
            scales = torch.tensor([block.down_scale for block in layer_plan.blocks], dtype=torch.float64)
        else:  # each at its own gate, which the family's scales give (plan.with_family_scales)
            assert [block.fixed_gate for block in layer_plan.blocks] == experts
            assert [block.down_scale for block in layer_plan.blocks] == [1.0] * m
            scales = stats.mean_gate[position, experts]
        torch.testing.assert_close(row[experts], scales / scales.sum())


def test_max_contribution_plans_the_best_expert_alone():
    stats = stats_with_contributions()
    result = plan("max_contribution", stats)
    best = stats.mean_contribution.argmax(-1)
    assert [len(p.blocks) for p in result.layers] == [1] * L
    assert [p.blocks[0].weights.index(1.0) for p in result.layers] == best.tolist()
    torch.testing.assert_close(result.weights, torch.nn.functional.one_hot(best, E).double())
    assert [p.blocks[0].fixed_gate for p in result.layers] == best.tolist()  # at its own gate
    gates = stats.mean_gate.gather(1, best[:, None]).flatten().tolist()
    scaled = with_family_scales(result.layers, MIXTRAL, transformers.MixtralConfig(), stats)
    assert [p.blocks[0].down_scale for p in scaled] == pytest.approx(gates)


@pytest.mark.parametrize(
    "bad", [torch.full((L, E), 0.5), torch.full((L, E - 1), 1 / (E - 1)), torch.full((L, E), float("nan"))]
)
def test_method_plans_check_the_weights_contract(bad):
    with pytest.raises(RuntimeError, match="method returned"):
        MethodPlan(bad, single_block_plans(fake_layers(), torch.full((L, E), 1 / E)))


def test_mergekit_cannot_run_the_methods_itself():
    from mergekit.merge_methods.base import TensorGroup

    tensors = [torch.randn(5, 7) for _ in range(3)]
    with pytest.raises(MethodError, match="weights from calibration"):
        mergekit_methods.get("router_weighted")([TensorGroup.from_tensors(tensors)])


def test_kernel_is_the_weighted_sum():
    tensors = [torch.randn(5, 7) for _ in range(3)]
    merged = weighted_sum(tensors, [0.2, 0.0, 0.8])
    torch.testing.assert_close(merged, 0.2 * tensors[0] + 0.8 * tensors[2])
    with pytest.raises(ValueError, match="shapes differ"):
        weighted_sum([torch.zeros(2, 3), torch.zeros(3, 2)], [0.5, 0.5])


def test_kernel_accumulates_bf16_experts_in_float32():
    tensors = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(3)]
    weights = [0.3, 0.45, 0.25]
    merged = weighted_sum(tensors, weights)
    expected = torch.zeros(64, 32)
    for e, tensor in enumerate(tensors):
        expected += weights[e] * tensor.float()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    assert weighted_sum([t.double() for t in tensors], weights).dtype == torch.float64


@pytest.mark.parametrize(
    "method,refit",
    [("router_weighted", "down_proj"), ("concat", "down_proj"), ("max_contribution", "down_proj"),
     ("prune_experts", "none"), ("merge_experts", "none"), ("expert_uniform", "none"),
     ("top_k_tempered", "none"), ("single_expert", "none")],
)  # fmt: skip
def test_the_measured_best_re_fit_is_the_default_and_baselines_stay_plain(method, refit):
    assert get_method(method).Parameters().refit == refit


def test_pruning_selects_by_reap_and_merging_weighs_by_frequency_by_default():
    assert get_method("prune_experts").Parameters().score == "reap"
    assert get_method("merge_experts").Parameters().score == "frequency"
