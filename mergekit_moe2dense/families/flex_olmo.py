# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""FlexOlmo (`flex_olmo`) -> OLMo-2 (`Olmo2ForCausalLM`).

FlexOlmo is OLMo-2 with a sparse MLP: the same attention (q/k RMSNorm over all
heads together), the same norms after attention and after the MLP, the same
embeddings, so OLMo-2 computes the merged model exactly. Router: softmax over all
experts, top-k, renormalised only with `norm_topk_prob: true` (the default is
false: see `routed_scale`). Every layer is sparse; experts are
`intermediate_size` wide. Checkpoint layouts: the shared ones (`common.py`).
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, MLP_EXPERTS
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget

FLEX_OLMO = MoEFamily(
    name="flex_olmo",
    model_types=("flex_olmo",),
    keys=ConfigKeys(experts="num_experts", expert_width="intermediate_size"),
    layouts=MLP_EXPERTS,
    dense=DenseTarget(transformers.Olmo2Config, "Olmo2ForCausalLM", DENSE_MLP),
    moe_architecture="FlexOlmoForCausalLM",
)
