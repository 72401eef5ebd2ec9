# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""GPT-OSS -> GPT-OSS with one expert and top-1 routing.

No dense class computes GPT-OSS's MLP: its experts have biases and a clamped SwiGLU,
(clamp(up, -l, l) + 1) * g * sigmoid(alpha g) with g = clamp(gate, max=l)
(`swiglu_limit`, `swiglu_alpha`), and its attention has sinks and alternating sliding
windows (`layer_types`). A GPT-OSS with a single expert, top-1, is exactly that MLP:
the router's softmax over one top-k logit is 1, whatever the router (written as zeros).

Checkpoint layout (the hub's and transformers' in-memory one; there is no per-expert
one): `mlp.experts.gate_up_proj` [E, H, 2I], each expert's matrix transposed and gate
and up interleaved (gate at even columns), `gate_up_proj_bias` [E, 2I] likewise,
`down_proj` [E, I, H], `down_proj_bias` [E, H]; the router `mlp.router` has a bias. The
official release stores the expert matrices as MXFP4 (`*_blocks`, `*_scales`), which
the checkpoint reader dequantizes. Routing takes a softmax over the top-k logits, so
the weights sum to 1 per token. A merged expert's biases are the same weighted sum
as its matrices (graph.projection_task).

A smaller GPT-OSS (`prune_experts`, `merge_experts`, `output: moe`) is written in this
fused layout: each kept or merged expert's matrices and biases are stacked into the
[N, ...] tensors of its layer (`graph.FuseExpert`), and the router's rows and bias are
the kept experts' (or a group's mix). Its down re-fit (`refit: down_proj`) fits the
experts' down matrices on their clamped SwiGLU activations, the biases kept.

The dense re-fits (`refit: scale | down_proj | fit`, `refit_gate_up: regmean`) compute the
dense MLP's h with this same clamped SwiGLU (`dense_hidden`: `expert_hidden` on the dense
MLP's projections and biases as a one-expert module) and fit its biases with its matrices
(calibration/refit/); the fitted tensors are written as expert 0 of `EXPERTS`.
"""

from __future__ import annotations

import torch
import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.spec import ConfigKeys, DenseTarget, FusedLayout

EXPERTS = FusedLayout(
    block="model.layers.{layer}.mlp",
    gate_up="{block}.experts.gate_up_proj",
    down="{block}.experts.down_proj",
    router="{block}.router.weight",
    transposed=True,
    interleaved=True,
    gate_up_bias="{block}.experts.gate_up_proj_bias",
    down_bias="{block}.experts.down_proj_bias",
)


def _one_expert(config) -> dict:
    return {"num_local_experts": 1, "num_experts_per_tok": 1}


class GptOssFamily(MoEFamily):
    def expert_output(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """GptOssExperts' computation for one expert (its own clamped SwiGLU, `_apply_gate`)."""
        return self.expert_hidden(experts, hidden, expert) @ experts.down_proj[expert] + experts.down_proj_bias[expert]

    def expert_hidden(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """The clamped SwiGLU of one expert, before its (transposed) down projection and bias."""
        return experts._apply_gate(hidden @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert])

    def dense_hidden(self, experts: torch.nn.Module, layer: int):
        """The re-fit's h: the clamped SwiGLU of the dense MLP's projections and biases, computed
        by `expert_hidden` on them as the one expert of a GPT-OSS experts module."""
        return lambda x, projections: self.expert_hidden(self.one_expert(experts, layer, projections), x, 0)

    def dense_block(self, dense: torch.nn.Module) -> torch.nn.Module:
        return _WithRouterScores(dense)


class _WithRouterScores(torch.nn.Module):
    """GptOssMLP returns (output, router scores); the decoder layer drops the scores."""

    def __init__(self, dense: torch.nn.Module):
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor):
        return self.dense(hidden_states), None


GPT_OSS = GptOssFamily(
    name="gpt_oss",
    model_types=("gpt_oss",),
    keys=ConfigKeys(experts="num_local_experts", expert_width="intermediate_size"),
    layouts=(EXPERTS,),
    renormalize=True,
    extra_tensors={"{block}.router.bias": ("E",)},
    router_module_path="model.layers.{layer}.mlp.router",
    dense=DenseTarget(
        transformers.GptOssConfig,
        "GptOssForCausalLM",
        # the dense MLP's projections and biases (names of the re-fit's tensors); written as expert 0 of `fused`
        {
            **{p: f"model.layers.{{layer}}.mlp.experts.{p}_proj" for p in ("gate", "up", "down")},
            **{f"{p}_bias": f"model.layers.{{layer}}.mlp.experts.{p}_proj_bias" for p in ("gate", "up", "down")},
        },
        overrides=_one_expert,
        zero_tensors={"model.layers.{layer}.mlp.router.weight": (1, "H"), "model.layers.{layer}.mlp.router.bias": (1,)},
        fused=EXPERTS,
    ),
    moe_architecture="GptOssForCausalLM",
)
