# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Every supported family: exactness on identical experts, both layouts, every method, refusals, hooks."""

from __future__ import annotations

import functools
import json
import logging
import re

import pytest
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from helpers import (
    METHOD_PARAMS,
    logits_of,
    make_config,
    make_mixtral,
    multimodal_text_logits,
    quantize_fp8_checkpoint,
    recorded_and_plain_logits,
    save_dequantized,
)
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.families import UnsupportedModelError, get_family
from mergekit_moe2dense.families.llama4 import LLAMA4_TEXT
from mergekit_moe2dense.families.qwen3_moe import MOE_CONFIG_KEYS
from mergekit_moe2dense.inspection import inspect_moe
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.job import ConversionJob
from mergekit_moe2dense.perplexity import EvaluationError, evaluate_models, load_eval_documents
from tiny_families import FAMILY_SPECS, MULTIMODAL_SPECS, make_family_moe, make_multimodal_moe

OPTIONS = MergeOptions(quiet=True)
TARGETS = {
    "qwen3_moe": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "dots1": "Qwen3ForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "ernie4_5_moe": "Ernie4_5ForCausalLM",
    "hunyuan_v1_moe": "HunYuanDenseV1ForCausalLM",
    "flex_olmo": "Olmo2ForCausalLM",
    "granitemoe": "GraniteForCausalLM",
    "granitemoeshared": "GraniteForCausalLM",
    "llama4_text": "Llama4ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5ForCausalLM",
}
# Targets that are the family itself: with one expert, top-1 (config keys), or with every layer dense.
ONE_EXPERT = {
    "olmoe": ("num_experts", "num_experts_per_tok"),
    "minimax_m2": ("num_local_experts", "num_experts_per_tok"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
}
ALL_DENSE = ("deepseek_v2", "deepseek_v3", "glm4_moe")
# MoE keys of the other families, none of which may reach a dense config
OTHER_MOE_KEYS = ("shared_expert_intermediate_size", "n_routed_experts", "n_shared_experts", "routed_scaling_factor")
OTHER_MOE_KEYS += ("moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_topk", "shared_intermediate_size")
# DeepSeek-V2 never renormalises its top-k weights; with k = E their sum is
# exactly routed_scaling_factor for every token, so identical experts stay exact.
# Llama 4's router scales the expert's input: exact when every token's score is the same
# (a zero router: sigmoid(0) = 1/2); with random routers, see test_llama4_input_scale_*.
IDENTICAL_OVERRIDES = {"deepseek_v2": {"num_experts_per_tok": 4}, "llama4_text": {"router_std": 0.0}}
# Every method on every family, layouts alternating (so each family is read in both).
CASES = [
    (family, ["legacy", "fused"][i % 2], method)
    for family in FAMILY_SPECS
    for i, method in enumerate(sorted(METHOD_PARAMS))
]
IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def family_moes(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("families")
    return {
        (family, layout): make_family_moe(
            family,
            root / f"{family}-{layout}",
            tokenizer_dir,
            identical=True,
            layout=layout,
            **IDENTICAL_OVERRIDES.get(family, {}),
        )
        for family in FAMILY_SPECS
        for layout in ("legacy", "fused")
    }


@pytest.mark.parametrize("family,layout,method", CASES)
def test_identical_experts_give_moe_logits(family_moes, calib_dir, tmp_path, family, layout, method):
    moe = family_moes[family, layout]
    out = tmp_path / "dense"
    build_dense(make_config(moe, method, calib_dir, **METHOD_PARAMS[method]), str(out), OPTIONS)
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(dense).__name__ == TARGETS[family]
    torch.testing.assert_close(logits_of(out, IDS), _moe_logits(moe), rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    if family in ONE_EXPERT:  # the single-expert target
        assert [config[key] for key in ONE_EXPERT[family]] == [1, 1]
        if family == "gpt_oss":  # every attention setting kept
            raw = json.loads((moe / "config.json").read_text())
            keys = ("layer_types", "sliding_window", "rope_parameters", "swiglu_limit", "swiglu_alpha", "head_dim")
            assert {key: config[key] for key in keys} == {key: raw[key] for key in keys}
    elif family == "qwen3_5_moe_text":  # the dense sibling: the hybrid attention layers as they were
        assert config["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
        raw = json.loads((moe / "config.json").read_text())
        assert config["rope_parameters"] == raw["rope_parameters"] and config["intermediate_size"] == 40
        assert not set(MOE_CONFIG_KEYS + OTHER_MOE_KEYS) & set(config)
    elif family == "qwen3_next":  # same class, every layer dense; linear-attention layers as they were
        assert config["mlp_only_layers"] == [0, 1, 2]
        assert config["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
    elif family == "llama4_text":  # same class, no MoE layer; every attention setting kept
        assert config["moe_layers"] == [] and config["intermediate_size_mlp"] == 40
        raw = json.loads((moe / "config.json").read_text())
        keys = ("no_rope_layers", "attention_chunk_size", "attn_temperature_tuning", "floor_scale", "use_qk_norm")
        assert {key: config[key] for key in keys} == {key: raw[key] for key in keys}
    elif family in ALL_DENSE:  # same class: its MoE fields are inert when every layer is dense
        assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 3
    else:
        assert not set(MOE_CONFIG_KEYS + OTHER_MOE_KEYS) & set(config)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "flex_olmo", "glm4_moe", "dots1"])
def test_unrenormalised_top_k_is_scaled_by_its_mean(calib_dir, tmp_path, tokenizer_dir, family):
    """norm_topk_prob: false with a constant router: the mixture weighs k/E = 1/2 (softmax), or
    k x sigmoid(0) x routed_scaling_factor (GLM-4.5, dots.llm1), not 1."""
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir, identical=True, norm_topk_prob=False, router_std=0.0)
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)


def test_qwen2_shared_gate_mean_scales_the_shared_expert(calib_dir, tmp_path, tokenizer_dir):
    """A random shared gate: the dense output uses its calibrated mean (recorded per layer)."""
    moe = make_family_moe("qwen2_moe", tmp_path / "moe", tokenizer_dir, identical=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(moe)
    with torch.no_grad():
        model.model.layers[1].mlp.shared_expert_gate.weight.normal_(0, 0.5)
    model.save_pretrained(moe)
    stats = _stats(moe)
    seen = {}

    def record(_module, _inputs, output):
        seen["gate"] = torch.sigmoid(output).mean()

    hook = model.model.layers[1].mlp.shared_expert_gate.register_forward_hook(record)
    with torch.no_grad():
        model(input_ids=_batch().input_ids)
    hook.remove()
    assert stats.layers == [1, 2]
    torch.testing.assert_close(stats.mean_shared_gate[0].float(), seen["gate"].float(), rtol=0, atol=1e-6)
    assert float(stats.mean_shared_gate[1]) == pytest.approx(0.5)  # layer 2: zero gate


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_hooks_record_moe_layers_only(family_moes, family):
    """Layer 0 is dense: one entry per MoE layer, each holding that layer's router."""
    moe = family_moes[family, "legacy"]
    stats = _stats(moe)
    assert stats.layers == [1, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(moe).eval()
    logits = {}

    def record(layer):
        def hook(_module, _inputs, output):
            logits[layer] = output[0].double().mean(0)

        return hook

    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(record(i)) for i in (1, 2)]
    with torch.no_grad():
        model(input_ids=_batch().input_ids)
    for hook in hooks:
        hook.remove()
    for position, layer in enumerate(stats.layers):
        torch.testing.assert_close(stats.mean_logits[position], logits[layer], rtol=0, atol=1e-5)


@functools.cache
def _moe_logits(path) -> torch.Tensor:
    return logits_of(path, IDS)


def _batch() -> TokenBatch:
    ids = IDS[:1]
    return TokenBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def _stats(path):
    source = SourceModel.open(ModelReference.parse(str(path)))
    calibration = CalibrationConfig(dataset="unused: the batch is given", max_token_samples=16, engine="full")
    return collect_statistics(source, [_batch()], calibration, progress=False)


@pytest.mark.parametrize(
    "config,expected",
    [
        (transformers.PhimoeConfig(), "sparsemixer gives NaN with one expert"),
        (transformers.DbrxConfig(), "DBRX"),
        (transformers.Llama4Config(quantization_config={"quant_method": "fbgemm_fp8"}), "fbgemm_fp8"),
        (transformers.Qwen3VLMoeConfig(), "multimodal checkpoint whose text model (qwen3_vl_moe_text) is an MoE"),
        (transformers.Qwen3MoeConfig(quantization_config={"quant_method": "gptq"}), "quantization_config: gptq"),
        (transformers.Qwen2MoeConfig(qkv_bias=False), "qkv_bias"),
        (transformers.DeepseekV2Config(mlp_bias=True), "mlp_bias"),
        (transformers.Ernie4_5_MoeConfig(use_bias=True), "ERNIE-4.5-MoE with use_bias: true"),
        (transformers.HunYuanMoEV1Config(num_experts=4, moe_topk=[2, 2]), "per-layer list of moe_topk"),
    ],
)
def test_refusals_name_the_family_and_the_supported_list(config, expected):
    with pytest.raises(UnsupportedModelError) as error:
        get_family(config)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert "qwen3_moe" in message or "dequantize" in message


def test_remote_code_model_is_refused_before_any_output(tmp_path, calib_dir):
    moe = tmp_path / "remote"
    moe.mkdir()
    (moe / "config.json").write_text(
        json.dumps({"model_type": "my_moe", "auto_map": {"AutoConfig": "x.MyConfig"}, "num_experts": 8})
    )
    out = tmp_path / "dense"
    with pytest.raises(UnsupportedModelError, match=r"model_type 'my_moe' is a remote-code model \(auto_map") as error:
        build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_calibrated_scales_need_a_calibration_block(family_moes, tmp_path):
    """expert_uniform needs no statistics, but Qwen2-MoE's shared-gate scale does."""
    from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig

    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": str(family_moes["qwen2_moe", "legacy"])}]}
    )
    out = tmp_path / "dense"
    with pytest.raises(ConfigError, match="qwen2_moe models need a calibration: block"):
        build_dense(config, str(out), OPTIONS)
    assert not out.exists()


REMOTE = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}


@pytest.mark.parametrize("family", ["mixtral", *FAMILY_SPECS])
def test_dense_config_keeps_only_what_the_target_knows(calib_dir, tmp_path, tokenizer_dir, family):
    """auto_map (remote code) and keys the target class does not know never reach the dense config.json."""
    if family == "mixtral":
        moe = make_mixtral(tmp_path / "moe", tokenizer_dir)
    else:
        moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir)
    raw = json.loads((moe / "config.json").read_text())
    raw.update(auto_map=REMOTE, junk_key_from_elsewhere=123)
    (moe / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "junk_key_from_elsewhere" not in config
    target = {"mixtral": "MistralForCausalLM", **TARGETS}[family]
    assert config["architectures"] == [target]
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)  # still loads, natively
    assert type(dense).__name__ == target
    kept = {"hidden_size", "num_attention_heads", "rms_norm_eps", "vocab_size", "eos_token_id"}
    assert {key: config[key] for key in kept} == {key: raw[key] for key in kept}


# -- every family through every engine and output: inspect, the layer stream, the re-fit, output: moe --


@pytest.mark.parametrize("family", FAMILY_SPECS)
def test_inspect_reads_both_layouts_of_every_family(family_moes, family):
    """Identical experts: cosine 1 in every MoE layer, the same report from either layout."""
    legacy, fused = (inspect_moe(str(family_moes[family, layout])) for layout in ("legacy", "fused"))
    config = transformers.AutoConfig.from_pretrained(family_moes[family, "legacy"])
    assert [layer.layer for layer in legacy.layers] == get_family(config).moe_layer_indices(config)
    for layer in legacy.layers:
        assert all(layer.weight_cosine[p] == pytest.approx(1.0, abs=1e-5) for p in ("gate", "up", "down"))
    legacy, fused = legacy.to_dict(), fused.to_dict()
    assert legacy.pop("model") != fused.pop("model")
    assert legacy == fused


@pytest.mark.parametrize("family", FAMILY_SPECS)
@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_layer_stream_gives_the_full_forward_statistics(calib_dir, tmp_path, tokenizer_dir, family, layout):
    """Every tensor of the family's layers is found and placed in either layout (router biases
    stored under other names included): the streamed engine records what the whole model does."""
    path = make_family_moe(family, tmp_path / "moe", tokenizer_dir, layout=layout)
    values = dict(dataset=str(calib_dir), num_samples=5, seq_len=24, batch_size=3, max_token_samples=40)
    _, batches = load_calibration_batches(str(path), CalibrationConfig(**values))
    source = SourceModel.open(ModelReference.parse(str(path)))
    full, streamed = (
        collect_statistics(source, batches, CalibrationConfig(**values, engine=engine), progress=False)
        for engine in ("full", "layerwise")
    )
    assert streamed.layers == full.layers == source.family.moe_layer_indices(source.config)
    assert streamed.tokens == full.tokens > 0
    for name in ("logit_sum", "gate_sum", "selected", "contribution_sum", "samples"):
        torch.testing.assert_close(getattr(streamed, name), getattr(full, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_SPECS)
def test_refit_on_the_layer_stream_keeps_identical_experts_exact(family_moes, calib_dir, tmp_path, caplog, family):
    """The re-fit's target is the MoE layer's whole MLP output (shared experts included): with
    identical experts the merged MLP gives it already (error 0 before the fit), every per-channel
    scale is 1, and the re-fitted model has the MoE's logits."""
    moe = family_moes[family, "fused"]
    out = tmp_path / "dense"
    with caplog.at_level(logging.INFO, logger="mergekit_moe2dense.outputs.dense"):
        build_dense(make_config(moe, "router_weighted", calib_dir, refit="scale"), str(out), OPTIONS)
    errors = {
        int(match[1]): (float(match[2]), float(match[3]))
        for match in re.finditer(
            r"layer (\d+): relative MLP reconstruction error (\S+) -> (\S+) after refit", caplog.text
        )
    }
    config = transformers.AutoConfig.from_pretrained(moe)
    assert sorted(errors) == get_family(config).moe_layer_indices(config)
    assert all(before < 1e-9 and after < 1e-9 for before, after in errors.values()), errors
    torch.testing.assert_close(logits_of(out, IDS), _moe_logits(moe), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILY_SPECS if f not in ("qwen3_moe", "olmoe")])  # those: kmeans tests
def test_rebuilt_moe_reproduces_logits(family_moes, calib_dir, tmp_path, family):
    moe = family_moes[family, "fused"]
    out = tmp_path / "moe"
    # Llama 4 adds its chosen experts' outputs (no renormalised mixture): exact at its own top-k only
    top_k = {"moe_top_k": 1} if family == "llama4_text" else {}
    config = make_config(moe, "kmeans_multi_dense", calib_dir, num_clusters=2, output="moe", **top_k)
    build_dense(config, str(out), OPTIONS)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(rebuilt).__name__ == type(transformers.AutoModelForCausalLM.from_pretrained(moe)).__name__
    torch.testing.assert_close(logits_of(out, IDS), _moe_logits(moe), rtol=0, atol=1e-5)


# -- Llama 4: the router scales the expert's input; the conversion folds its calibrated mean in --


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("router_std", [0.1, 0.5, 2.0])
def test_llama4_input_scale_approximates_random_routers(calib_dir, tmp_path, tokenizer_dir, router_std):
    """Identical experts, random routers: the MoE layer computes shared(x) + E(s x) per token, the
    dense layer shared(x) + E(c x), c the calibrated mean score (gate and up rows times c; exact
    for s = c: the identical-experts test). Measured: the layer's error on random tokens, next to
    scaling the output instead (c E(x)), which it beats where the scores spread little; the
    logits error end to end."""
    moe = make_family_moe("llama4_text", tmp_path / "moe", tokenizer_dir, identical=True, router_std=router_std)
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    logits_error = _relative(logits_of(out, IDS), logits_of(moe, IDS))
    block = transformers.AutoModelForCausalLM.from_pretrained(moe).model.layers[1].feed_forward
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores, _ = block.router(x)
        s = scores.max(-1, keepdim=True).values  # top-1: the one chosen score
        c = float(s.mean())
        expert = functools.partial(LLAMA4_TEXT.expert_output, block.experts, expert=0)
        shared, moe_out = block.shared_expert(x), block(x)[0]
        exact = _relative(shared + expert(s * x), moe_out)
        folded = _relative(shared + expert(c * x), moe_out)
        output_scaled = _relative(shared + c * expert(x), moe_out)
    print(
        f"llama4 router_std {router_std}: score {float(s.min()):.3f}..{float(s.max()):.3f} (mean {c:.3f}, "
        f"std {float(s.std()):.3f}); layer error input-scaled {folded:.4f}, output-scaled {output_scaled:.4f}; "
        f"logits error {logits_error:.4f}"
    )
    assert exact < 1e-6  # the MoE layer is what the docstring says
    assert folded > 1e-4 and logits_error > 1e-4  # an approximation, as the README says
    if router_std <= 0.1:
        assert folded < output_scaled / 2


# -- multi-token-prediction layers: stored after the last decoder layer, not part of the model --


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_multi_token_prediction_layers_are_not_copied(calib_dir, tmp_path, tokenizer_dir, family):
    """A released DeepSeek-V3 / GLM-4.5 checkpoint stores `num_nextn_predict_layers` more layers,
    `model.layers.{num_hidden_layers}.*` (a whole MoE layer plus its projection and norms), which
    transformers ignores on load: the dense output leaves them out, and so does its size estimate."""
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir, identical=True)
    shard = moe / "model.safetensors"
    tensors = load_file(shard)
    mtp = {
        name.replace("model.layers.2.", "model.layers.3."): t.clone() for name, t in tensors.items() if ".2." in name
    }
    mtp |= {"model.layers.3.eh_proj.weight": torch.randn(32, 64), "model.layers.3.enorm.weight": torch.ones(32)}
    save_file(tensors | mtp, shard, metadata={"format": "pt"})
    raw = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**raw, "num_nextn_predict_layers": 1}))
    out = tmp_path / "dense"
    config = make_config(moe, "expert_uniform", calib_dir)
    job = ConversionJob.prepare(config, str(out), OPTIONS)
    estimate = job.output.estimated_bytes(job)
    build_dense(config, str(out), OPTIONS)
    written = {}
    for path in out.glob("model*.safetensors"):  # not router_stats.safetensors
        written |= load_file(path)
    assert written and not [name for name in written if name.startswith("model.layers.3.")]
    assert estimate <= sum(t.numel() * t.element_size() for t in written.values())
    assert estimate + sum(t.numel() * t.element_size() for t in mtp.values()) > sum(
        t.numel() * t.element_size() for t in written.values()
    )
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)


# -- concat: each kept expert at its own fixed gate, the router's weight counted once --


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen3_moe", {"norm_topk_prob": False}),  # softmax top-2 of 4 not renormalised: 1/4 + 1/4 per token
        ("deepseek_v2", {}),  # never renormalised, routed_scaling_factor 1.5: 2 x 1/4 x 1.5
        ("deepseek_v3", {}),  # renormalised, then times routed_scaling_factor 2.5
        ("glm4_moe", {"norm_topk_prob": False}),  # sigmoid(0) x routed_scaling_factor 2.5 per chosen expert
        ("llama4_text", {}),  # the router scales the expert's input: E(x / 2), counted once
    ],
)
@pytest.mark.parametrize("num_experts", [None, 4])  # the model's top-k, every expert
def test_concat_counts_the_router_weight_once(calib_dir, tmp_path, tokenizer_dir, family, overrides, num_experts):
    """Identical experts and a constant router (every token the same top-k weights, whose sum is
    not 1): the MoE is its own fixed-gate mixture, so concat of the top-k or of every expert,
    each at its calibrated mean gate, gives the MoE's logits exactly."""
    moe = make_family_moe(family, tmp_path / "moe", tokenizer_dir, identical=True, router_std=0.0, **overrides)
    out = tmp_path / "dense"
    params = {} if num_experts is None else {"num_experts": num_experts}
    build_dense(make_config(moe, "concat", calib_dir, **params), str(out), OPTIONS)
    torch.testing.assert_close(logits_of(out, IDS), logits_of(moe, IDS), rtol=0, atol=1e-5)


def _concat_scales(family, config, selected, gate_sum, gates="mean"):
    """(down scales, input scales) of the routed blocks of concat of 3 of 4 experts, one MoE layer."""
    from mergekit_moe2dense.families import MoELayer
    from mergekit_moe2dense.methods.concat import Concat
    from mergekit_moe2dense.plan import with_family_scales
    from mergekit_moe2dense.statistics import RouterStatistics

    stats = RouterStatistics(
        layers=[1], num_experts=4, top_k=1, tokens=10, selected=torch.tensor([selected], dtype=torch.float64)
    )
    stats.gate_sum = torch.tensor([gate_sum], dtype=torch.float64)
    stats.contribution_sum = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    layer = MoELayer(1, tuple({} for _ in range(4)), "router", ())
    method = Concat()
    params = method.resolve_parameters({"num_experts": 3, "gates": gates}, num_experts=4, top_k=1)
    plan = with_family_scales(method.plan(stats, params, [layer]).layers, family, config, stats)[0]
    routed = [block for block in plan.blocks if block.shared is None]
    return [b.down_scale for b in routed], [b.input_scale for b in routed]


def test_concat_fixed_gates_per_family():
    """Llama 4: expert e is f_e E_e(c_e x), f_e its selection frequency, c_e its mean score when
    chosen (the layer's mean where never chosen); an output-weighted family: gbar_e E_e(x), its
    mean top-k weight (routed scale included, once); `gates: equal`: 1/m of the whole mixture."""
    selected, gate_sum = [6.0, 4.0, 0.0, 0.0], [3.0, 3.2, 0.0, 0.0]
    llama4 = transformers.Llama4TextConfig(num_local_experts=4, num_experts_per_tok=1)
    down, into = _concat_scales(LLAMA4_TEXT, llama4, selected, gate_sum)
    assert down == pytest.approx([0.6, 0.4, 0.0]) and into == pytest.approx([0.5, 0.8, 0.62])
    qwen3 = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=1, norm_topk_prob=False)
    down, into = _concat_scales(get_family(qwen3), qwen3, selected, gate_sum)
    assert down == pytest.approx([0.3, 0.32, 0.0]) and into == [1.0, 1.0, 1.0]
    down, into = _concat_scales(get_family(qwen3), qwen3, selected, gate_sum, gates="equal")
    assert down == pytest.approx([0.62 / 3] * 3) and into == [1.0, 1.0, 1.0]
    down, into = _concat_scales(LLAMA4_TEXT, llama4, selected, gate_sum, gates="equal")
    assert down == pytest.approx([1 / 3] * 3) and into == pytest.approx([0.62] * 3)


# -- multimodal checkpoints: their text part converts, the vision tower is left out --

MULTIMODAL = [("llama4", "legacy"), ("qwen3_5_moe", "legacy"), ("qwen3_5_moe", "fused")]  # Llama 4: one layout


@pytest.mark.parametrize("model_type,layout", MULTIMODAL)
def test_multimodal_text_part_converts(calib_dir, tmp_path, tokenizer_dir, caplog, model_type, layout):
    """Identical experts (Llama 4: a constant router): the text-only dense model, which loads with
    no missing or unexpected key, gives the multimodal MoE's text logits; no vision tensor is written."""
    family = MULTIMODAL_SPECS[model_type][0]
    moe = make_multimodal_moe(
        model_type,
        tmp_path / "moe",
        tokenizer_dir,
        identical=True,
        layout=layout,
        **IDENTICAL_OVERRIDES.get(family, {}),
    )
    out = tmp_path / "dense"
    with caplog.at_level(logging.INFO, logger="mergekit_moe2dense.io.source"):
        build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    assert f"multimodal {model_type} checkpoint: its text model ({family})" in caplog.text
    assert "vision tower" in caplog.text and "left out" in caplog.text
    dense, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(dense).__name__ == TARGETS[family]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((out / "config.json").read_text())["model_type"] == dense.config.model_type != model_type
    written = set(load_file(out / "model.safetensors"))
    assert not [n for n in written if "vision" in n or "visual" in n or "language_model" in n or "projector" in n]
    torch.testing.assert_close(logits_of(out, IDS), multimodal_text_logits(moe, model_type, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL_SPECS))
def test_multimodal_inspect_engines_and_eval(calib_dir, tmp_path, tokenizer_dir, model_type):
    """A multimodal checkpoint reads as its text model: `inspect` gives the text-only checkpoint's
    report, the layer stream the full engine's statistics, and `eval` scores the text model,
    its --seq-len limit being the text model's."""
    family = MULTIMODAL_SPECS[model_type][0]
    text = tmp_path / "text"  # the same text model, text-only
    multimodal = make_multimodal_moe(model_type, tmp_path / "mm", tokenizer_dir, text_twin=text)
    assert get_family(transformers.AutoConfig.from_pretrained(multimodal)) is get_family(
        transformers.AutoConfig.from_pretrained(text)
    )
    reports = [inspect_moe(str(path)).to_dict() for path in (multimodal, text)]
    assert reports[0].pop("model") != reports[1].pop("model")
    assert reports[0] == reports[1]
    values = dict(dataset=str(calib_dir), num_samples=4, seq_len=24, batch_size=2, max_token_samples=20)
    _, batches = load_calibration_batches(str(multimodal), CalibrationConfig(**values))
    source = SourceModel.open(ModelReference.parse(str(multimodal)))
    assert source.config.model_type == family and source.text_part.model_type == model_type
    full, streamed = (
        collect_statistics(source, batches, CalibrationConfig(**values, engine=engine), progress=False)
        for engine in ("full", "layerwise")
    )
    assert streamed.layers == full.layers == source.family.moe_layer_indices(source.config)
    for name in ("logit_sum", "gate_sum", "selected", "contribution_sum", "samples"):
        torch.testing.assert_close(getattr(streamed, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    documents = load_eval_documents(calib_dir)
    results = evaluate_models([str(multimodal), str(text)], documents, seq_len=32, progress=False)
    assert results[0].perplexity == pytest.approx(results[1].perplexity, rel=1e-5)
    with pytest.raises(EvaluationError, match="max_position_embeddings 256"):
        evaluate_models([str(multimodal)], documents, seq_len=300, progress=False)


def test_qwen3_5_moe_text_saved_under_the_multimodal_names(calib_dir, tmp_path, tokenizer_dir):
    """transformers 5 saves the text-only Qwen3.5-MoE it loaded from a multimodal checkpoint as
    `qwen3_5_moe_text` under `model.language_model.*`: that converts too, and its `mtp.*`
    (multi-token prediction, which transformers ignores) is not copied."""
    multimodal = make_multimodal_moe("qwen3_5_moe", tmp_path / "mm", tokenizer_dir, identical=True)
    moe = tmp_path / "moe"
    transformers.AutoModelForCausalLM.from_pretrained(multimodal).save_pretrained(moe)
    transformers.AutoTokenizer.from_pretrained(multimodal).save_pretrained(moe)
    tensors = load_file(moe / "model.safetensors")
    assert any(name.startswith("model.language_model.layers.") for name in tensors)
    save_file(tensors | {"mtp.fc.weight": torch.randn(32, 64)}, moe / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((moe / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    out = tmp_path / "dense"
    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out), OPTIONS)
    written = load_file(out / "model.safetensors")
    assert not [name for name in written if "language_model" in name or name.startswith("mtp.")]
    torch.testing.assert_close(
        logits_of(out, IDS), multimodal_text_logits(multimodal, "qwen3_5_moe", IDS), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL_SPECS))
def test_multimodal_refit_and_concat(calib_dir, tmp_path, tokenizer_dir, model_type):
    """The re-fit on the layer stream and concat read the multimodal checkpoint's text model:
    identical experts (Llama 4: a constant router) stay exact."""
    family = MULTIMODAL_SPECS[model_type][0]
    overrides = IDENTICAL_OVERRIDES.get(family, {})
    moe = make_multimodal_moe(model_type, tmp_path / "moe", tokenizer_dir, identical=True, **overrides)
    expected = multimodal_text_logits(moe, model_type, IDS)
    # concat of every expert: their mean gates sum to the mixture's weight, exact
    for method, params in (("router_weighted", {"refit": "scale"}), ("concat", {"num_experts": 4})):
        out = tmp_path / method
        build_dense(make_config(moe, method, calib_dir, **params), str(out), OPTIONS)
        torch.testing.assert_close(logits_of(out, IDS), expected, rtol=0, atol=1e-4)


def test_multimodal_fp8_checkpoint_converts_to_the_dequantized_text_model(calib_dir, tmp_path, tokenizer_dir):
    """A block-wise FP8 multimodal checkpoint (`quantization_config` at the top of config.json, the
    scales beside their weights under the multimodal names) dequantizes on read as the text model."""
    moe = make_multimodal_moe("qwen3_5_moe", tmp_path / "moe", tokenizer_dir, identical=True, layout="fused")
    quantized, reference = quantize_fp8_checkpoint(
        moe, tmp_path / "fp8", (16, 16), lambda name: "language_model" in name and name.endswith("_proj.weight")
    )
    assert reference and all(name.startswith("model.language_model.") for name in reference)
    dequantized = save_dequantized(moe, tmp_path / "deq", reference)
    out = tmp_path / "dense"
    build_dense(make_config(quantized, "router_weighted", calib_dir), str(out), OPTIONS)
    assert not [name for name in load_file(out / "model.safetensors") if "scale_inv" in name]
    torch.testing.assert_close(
        logits_of(out, IDS), multimodal_text_logits(dequantized, "qwen3_5_moe", IDS), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_contributions_recorded_in_the_experts_forward_in_every_family(family, tokenizer_dir, calib_dir, tmp_path):
    """Random (not identical) experts: with the recorder on (in the experts' forward, or Llama 4's
    hook), each family's logits are its plain forward's, and the contributions are the recomputing hook's (which reads each expert's
    weights itself), so no expert's output goes to another's statistic."""
    path = make_family_moe(family, tmp_path / family, tokenizer_dir, seed=3)
    recorded, plain, stats, _ = recorded_and_plain_logits(path, calib_dir, torch.float32, None)  # its own way
    _, _, reference, _ = recorded_and_plain_logits(path, calib_dir, torch.float32, False)
    for a, b in zip(recorded, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # eager experts may sum in another order
    assert stats.contribution_sum.abs().sum() > 0
    torch.testing.assert_close(stats.contribution_sum, reference.contribution_sum, rtol=1e-5, atol=1e-6)
