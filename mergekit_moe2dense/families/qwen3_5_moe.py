# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen3.5-MoE text (`qwen3_5_moe_text`) -> Qwen3.5 text (`Qwen3_5ForCausalLM`).

Qwen3.5-MoE builds a sparse block in every decoder layer (there is no `mlp_only_layers`),
so, unlike Qwen3-Next, the class has no dense form of its own. Its dense sibling,
`qwen3_5_text`, is the same model with `Qwen3_5MLP` in place of the sparse block: the
decoder layer, the hybrid attention (Gated DeltaNet `linear_attention` layers and gated
full attention, per `layer_types`), the norms, the partial multimodal rotary embedding
and every config key but the MoE ones are the same (transformers' modular file derives
one from the other; checked line by line in transformers 5). So the target is that class.

The sparse block is Qwen2-MoE's: softmax router, top-k always renormalised (scale 1),
a shared expert scaled per token by sigmoid(`shared_expert_gate`(x)), which becomes one
more block of the dense MLP scaled by that gate's calibrated mean. Checkpoints: the
`qwen2_moe` layouts (per-expert names, what `save_pretrained` writes, or fused).

The multimodal Qwen3.5-MoE (`qwen3_5_moe`, `Qwen3_5MoeForConditionalGeneration`, the hub's
releases) holds this text model as `model.language_model` (`model.language_model.layers...`,
`lm_head.weight`, config.json's `text_config`) beside a vision tower (`model.visual.*`) and,
in the released checkpoints, multi-token-prediction layers (`mtp.*`, which transformers
ignores): its text part converts, to the same dense text model, the rest left out
(`QWEN3_5_MOE_MULTIMODAL`). transformers' `Qwen3_5MoeForCausalLM` loads that checkpoint
the same way (its conversion mapping drops `language_model`), for `eval` and the full
calibration engine. transformers 5 also saves the text-only class under the multimodal
names (`Qwen3_5MoeForCausalLM.save_pretrained` after loading the multimodal checkpoint
writes `model.language_model.*` with model_type `qwen3_5_moe_text`), and its loader reads
either: so does the conversion (`QWEN3_5_MOE_TEXT_NAMES`).
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP
from mergekit_moe2dense.families.qwen2_moe import QWEN2_MOE_BLOCK
from mergekit_moe2dense.families.spec import DenseTarget, TextPart

QWEN3_5_MOE = MoEFamily(
    name="qwen3_5_moe_text",
    model_types=("qwen3_5_moe_text",),
    renormalize=True,  # Qwen3_5MoeTopKRouter divides its top-k probabilities by their sum
    **QWEN2_MOE_BLOCK,
    dense=DenseTarget(transformers.Qwen3_5TextConfig, "Qwen3_5ForCausalLM", DENSE_MLP),
    moe_architecture="Qwen3_5MoeForCausalLM",
)

QWEN3_5_MOE_MULTIMODAL = TextPart(
    model_type="qwen3_5_moe",
    prefixes=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    dropped="the vision tower (model.visual.*) and multi-token-prediction layers (mtp.*)",
)

# a text-only checkpoint: its tensors under the text model's own names or the multimodal ones
QWEN3_5_MOE_TEXT_NAMES = TextPart(
    model_type="qwen3_5_moe_text",
    prefixes=(("model.language_model.", "model."), ("model.", "model."), ("lm_head.", "lm_head.")),
    dropped="multi-token-prediction layers (mtp.*)",
    multimodal=False,
)
