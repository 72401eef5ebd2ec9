# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""dots.llm1 (`dots1`) -> Qwen3.

dots.llm1's sparse block is DeepSeek-V3's (sigmoid router with
`e_score_correction_bias`, group-limited top-k, `norm_topk_prob`,
`routed_scaling_factor`, `n_shared_experts` ungated shared experts, the first
`first_k_dense_replace` layers dense); see `deepseek.py` for how the mixture is
scaled. Its attention is Qwen3's line for line (per-head q/k RMSNorm,
`attention_bias` on q/k/v/o, a sliding window in the layers `layer_types` says),
and so are its norms and rotary embedding, so the dense target is
`Qwen3ForCausalLM`, given `head_dim` explicitly (Qwen3's default is 128) and
`use_sliding_window` where any layer slides (Qwen3 drops `sliding_window` otherwise).
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP
from mergekit_moe2dense.families.deepseek import DEEPSEEK_V3_BLOCK
from mergekit_moe2dense.families.spec import DenseTarget


def _qwen3_values(config) -> dict:
    return {
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "use_sliding_window": "sliding_attention" in config.layer_types,
        "layer_types": list(config.layer_types),
    }


DOTS1 = MoEFamily(
    name="dots1",
    model_types=("dots1",),
    **DEEPSEEK_V3_BLOCK,
    dense=DenseTarget(transformers.Qwen3Config, "Qwen3ForCausalLM", DENSE_MLP, overrides=_qwen3_values),
    moe_architecture="Dots1ForCausalLM",
)
