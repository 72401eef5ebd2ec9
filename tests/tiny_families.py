# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Tiny random MoEs of every supported family, built with transformers' own config classes."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from helpers import save_model

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# family -> (config class, model class, overrides). Layer 0 is dense where the family can say so.
FAMILY_SPECS = {
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            head_dim=8,
        ),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
    ),
    "deepseek_v2": (
        transformers.DeepseekV2Config,
        transformers.DeepseekV2ForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.5,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        transformers.DeepseekV3ForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_key_value_heads=4,
        ),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2),
    ),
    "qwen3_next": (
        transformers.Qwen3NextConfig,
        transformers.Qwen3NextForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
    ),
    "gpt_oss": (
        transformers.GptOssConfig,
        transformers.GptOssForCausalLM,
        dict(
            intermediate_size=32,  # MXFP4 packs 32 values a scale: widths are multiples of 32
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=6,  # shorter than the test sequences: the sliding layers differ from the full ones
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "factor": 2.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
            swiglu_limit=0.5,  # small enough that the clamps are active on these weights
            swiglu_alpha=1.3,
        ),
    ),
    # partial rotary (0.5, the default), per-head q/k norms and q/k/v biases carried over
    "glm4_moe": (
        transformers.Glm4MoeConfig,
        transformers.Glm4MoeForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            use_qk_norm=True,
            attention_bias=True,
        ),
    ),
    # a sliding window in layers 1 and 2 only, biases on q/k/v/o
    "dots1": (
        transformers.Dots1Config,
        transformers.Dots1ForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            attention_bias=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    # partial rotary through the legacy rotary_dim field of the hub configs
    "minimax_m2": (
        transformers.MiniMaxM2Config,
        transformers.MiniMaxM2ForCausalLM,
        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, rotary_dim=4),
    ),
    # 4 layers: 0 and 3 dense (moe_layer_start_index, moe_layer_end_index), tied embeddings (ERNIE's default)
    "ernie4_5_moe": (
        transformers.Ernie4_5_MoeConfig,
        transformers.Ernie4_5_MoeForCausalLM,
        dict(
            num_hidden_layers=4,
            intermediate_size=40,
            moe_intermediate_size=16,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            moe_layer_end_index=2,
        ),
    ),
    "hunyuan_v1_moe": (
        transformers.HunYuanMoEV1Config,
        transformers.HunYuanMoEV1ForCausalLM,
        dict(intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8, attention_bias=True),
    ),
    "flex_olmo": (
        transformers.FlexOlmoConfig,
        transformers.FlexOlmoForCausalLM,
        dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    # Granite's four multipliers, none of them 1
    "granitemoe": (
        transformers.GraniteMoeConfig,
        transformers.GraniteMoeForCausalLM,
        dict(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=3.0,
        ),
    ),
    "granitemoeshared": (
        transformers.GraniteMoeSharedConfig,
        transformers.GraniteMoeSharedForCausalLM,
        dict(
            intermediate_size=24,
            shared_intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=3.0,
        ),
    ),
    # every layer sparse (the class has no dense layers); hybrid attention, partial rotary
    "qwen3_5_moe_text": (
        transformers.Qwen3_5MoeTextConfig,
        transformers.Qwen3_5MoeForCausalLM,
        dict(
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
    ),
    # 4 layers, MoE in 1 and 3 (interleave_moe_layer_step 2); layer 3 NoPE with temperature tuning,
    # chunked attention shorter than the test sequences, L2 q/k norm on the rope layers
    "llama4_text": (
        transformers.Llama4TextConfig,
        transformers.Llama4ForCausalLM,
        dict(
            num_hidden_layers=4,
            intermediate_size=16,
            intermediate_size_mlp=40,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            head_dim=8,
            attention_chunk_size=8,
            no_rope_layer_interval=4,
            attn_temperature_tuning=True,
            floor_scale=4,
            attn_scale=0.5,
            use_qk_norm=True,
        ),
    ),
}


def make_family_moe(
    family: str,
    path: Path,
    tokenizer_dir: Path,
    *,
    identical: bool = False,
    layout: str = "legacy",
    seed: int = 0,
    router_std: float = 0.5,
    **overrides,
) -> Path:
    """Save a random tiny MoE of `family`.

    `identical` copies expert 0 into every routed expert and zeroes the
    shared-expert gate (sigmoid(0) = 1/2 for every token), so with renormalised
    top-k weights the MoE computes a fixed dense MLP. `router_std=0` gives every
    token the same router probabilities.
    """
    config_class, model_class, values = FAMILY_SPECS[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), **{**COMMON, **values, **overrides})
    model = model_class(config).eval()
    _init_layers(model.model.layers, identical, router_std)
    return save_model(model, tokenizer, path, layout)


# multimodal model_type -> (its text family, config class, model class, a tiny vision tower,
# where the model keeps its text decoder, its text model's state dict as the text-only class names it)
MULTIMODAL_SPECS = {
    "llama4": (
        "llama4_text",
        transformers.Llama4Config,
        transformers.Llama4ForConditionalGeneration,
        dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=14,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            pixel_shuffle_ratio=0.5,
        ),
        lambda model: model.language_model.model,
        lambda model: model.language_model.state_dict(),
    ),
    "qwen3_5_moe": (
        "qwen3_5_moe_text",
        transformers.Qwen3_5MoeConfig,
        transformers.Qwen3_5MoeForConditionalGeneration,
        dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, patch_size=14),
        lambda model: model.model.language_model,
        lambda model: (
            {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
            | {"lm_head.weight": model.lm_head.weight}
        ),
    ),
}


def make_multimodal_moe(
    model_type: str,
    path: Path,
    tokenizer_dir: Path,
    *,
    identical: bool = False,
    layout: str = "legacy",
    seed: int = 0,
    router_std: float = 0.5,
    text_twin: Path | None = None,
) -> Path:
    """Save a random tiny multimodal checkpoint (`MULTIMODAL_SPECS`): the text model of
    `make_family_moe`'s text family (the same settings) beside a tiny vision tower; and, to
    `text_twin`, the same text model as a text-only checkpoint of its family."""
    family, config_class, model_class, vision, decoder, text_state = MULTIMODAL_SPECS[model_type]
    _, _, values = FAMILY_SPECS[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), **COMMON, **values}
    model = model_class(config_class(text_config=text, vision_config=vision)).eval()
    _init_layers(decoder(model).layers, identical, router_std)
    if text_twin is not None:
        twin = FAMILY_SPECS[family][1](model.config.get_text_config()).eval()
        twin.load_state_dict(text_state(model), strict=True)
        save_model(twin, tokenizer, text_twin, layout)
    return save_model(model, tokenizer, path, layout)


def _init_layers(layers, identical: bool, router_std: float) -> None:
    """Larger random weights than the default init (so that wrong merges show), routers of
    `router_std`, and with `identical` every routed expert a copy of expert 0."""
    with torch.no_grad():
        for layer in layers:
            # Granite's block_sparse_moe, Llama 4's feed_forward
            mlp = next(
                getattr(layer, name) for name in ("mlp", "block_sparse_moe", "feed_forward") if hasattr(layer, name)
            )
            if not hasattr(mlp, "experts"):
                for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    proj.weight.normal_(0, 0.2)
                continue
            # A larger init than the default 0.02 so that merges that are wrong show.
            mlp.experts.gate_up_proj.normal_(0, 0.2)
            mlp.experts.down_proj.normal_(0, 0.2)
            router = mlp.gate if hasattr(mlp, "gate") else mlp.router
            (router.wg if hasattr(router, "wg") else router).weight.normal_(0, router_std)  # HunYuan's wg
            for bias in (getattr(router, "bias", None), *_expert_biases(mlp.experts)):
                if bias is not None:
                    bias.normal_(0, 0.1 if router_std else 0.0)
            if hasattr(getattr(layer, "self_attn", None), "sinks"):  # GPT-OSS's attention sinks
                layer.self_attn.sinks.normal_(0, 0.5)
            # DeepSeek-style correction biases, wherever the family keeps them
            tensors = dict(mlp.named_buffers()) | dict(mlp.named_parameters())
            for name, tensor in tensors.items():
                if name.endswith("e_score_correction_bias"):
                    tensor.normal_(0, 0.1)
            shared = next(
                (
                    module
                    for module in (
                        getattr(mlp, name, None) for name in ("shared_expert", "shared_experts", "shared_mlp")
                    )
                    if module is not None
                ),
                getattr(layer, "shared_mlp", None),  # Granite's, beside the sparse block
            )
            if shared is not None:
                for weight in shared.parameters():
                    weight.normal_(0, 0.2)
            if hasattr(mlp, "shared_expert_gate"):
                mlp.shared_expert_gate.weight.normal_(0, 0.5)
            if identical:
                for tensor in (mlp.experts.gate_up_proj, mlp.experts.down_proj, *_expert_biases(mlp.experts)):
                    tensor[:] = tensor[0].clone()
                if hasattr(mlp, "shared_expert_gate"):
                    mlp.shared_expert_gate.weight.zero_()


def _expert_biases(experts) -> list[torch.Tensor]:
    """GPT-OSS's expert biases [E, 2I], [E, H] (none elsewhere)."""
    return [getattr(experts, name) for name in ("gate_up_proj_bias", "down_proj_bias") if hasattr(experts, name)]
