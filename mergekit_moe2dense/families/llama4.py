# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Llama 4 text (`llama4_text`) -> Llama 4 text with every layer dense (`moe_layers: []`).

`Llama4TextMoe` computes shared(x) + sum_e E_e(s_e x): the router keeps the top-k logits,
s_e = sigmoid(logit_e) for them and 0 for the rest, and multiplies each expert's *input*
by s_e (not its output). An expert is SwiGLU, E(x) = D (act(G x) * (U x)), so for one
factor c, E(c x) = D (act(c G x) * (c U x)): the factor folds exactly into the gate and up
rows. The dense MLP of a layer is therefore

    k * M(c x) + shared(x),   c = E_t[mean over the k chosen experts of s_e]

with M the merged expert (gate and up rows times c, down times k = `num_experts_per_tok`,
`plan.with_family_scales`), c calibrated per layer from the router's own top-k scores.
`concat` keeps m experts each at its own fixed gate instead: sum_e f_e E_e(c_e x), f_e the
fraction of tokens choosing e (each adds e's whole output once), c_e e's mean score over
them (`fixed_gate`).
This is exact when every token's chosen scores equal c (identical experts then give the
MoE's output); otherwise it approximates E(s x) by E(c x) (SiLU is not homogeneous, so
no dense MLP computes E(s x) for a per-token s).

The target is Llama 4 text itself: a layer not in `moe_layers` builds `Llama4TextMLP` of
width `intermediate_size_mlp` (`feed_forward.gate_proj/up_proj/down_proj`), so chunked
attention, NoPE layers (`no_rope_layers`), the L2 q/k norm and attention temperature
tuning are the MoE's own. The layers that were dense already pass through.

Checkpoint layout (the hub's and transformers' in-memory one; there is no per-expert
one): `feed_forward.experts.gate_up_proj` [E, H, 2I] (transposed, gate columns first),
`feed_forward.experts.down_proj` [E, I, H], router `feed_forward.router.weight` [E, H],
ungated shared expert `feed_forward.shared_expert.*` of width `intermediate_size`.

The multimodal Llama 4 (`llama4`, `Llama4ForConditionalGeneration`: Scout, Maverick) holds
this text model as `language_model` (`language_model.model.layers...`,
`language_model.lm_head.weight`, config.json's `text_config`) beside a vision tower
(`vision_model.*`, `multi_modal_projector.*`): its text part converts, to the same dense
text model, and the vision tower is left out (`LLAMA4_MULTIMODAL`). transformers' own
`Llama4ForCausalLM` loads that checkpoint the same way (its `base_model_prefix` is
`language_model`), which is what `eval` and the full calibration engine use.
"""

from __future__ import annotations

import torch
import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.spec import (
    ConfigKeys,
    DenseTarget,
    FusedLayout,
    SharedExperts,
    SparseLayers,
    TextPart,
)

BLOCK = "model.layers.{layer}.feed_forward"

EXPERTS = FusedLayout(
    block=BLOCK,
    gate_up="{block}.experts.gate_up_proj",
    down="{block}.experts.down_proj",
    router="{block}.router.weight",
    transposed=True,
)


def _all_dense(config) -> dict:
    return {"moe_layers": []}


class _WithRouterLogits(torch.nn.Module):
    """The dense MLP where `Llama4TextDecoderLayer` expects its sparse block: (output, logits)."""

    def __init__(self, dense: torch.nn.Module):
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor):
        return self.dense(x), None


class Llama4Family(MoEFamily):
    def router_outputs(self, output):
        """`Llama4Router` returns (scores [T, E]: sigmoid of the top-k logits, 0 elsewhere, logits
        [T, E]); the chosen experts are the top-k logits (the same `topk` as the router's), k
        read from the scores (a chosen score is sigmoid of a finite logit, above 0)."""
        scores, logits = output
        k = max(1, int((scores > 0).sum(-1).max()))
        index = logits.topk(k, dim=-1).indices
        return logits, scores.gather(-1, index), index

    def expert_output(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """`Llama4TextExperts` for one expert on (already scaled) inputs: transposed weights."""
        gate, up = (hidden @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return (experts.act_fn(gate) * up) @ experts.down_proj[expert]

    def expert_contributions(self, experts: torch.nn.Module, inputs: tuple, keep: torch.Tensor):
        """The experts module gets every expert's input, [E * T, H]: x times its router score
        (0 where not chosen). A chosen expert's contribution is the norm of its output on that
        scaled input, which already carries the router's weight (weight 1)."""
        routed = inputs[0].reshape(experts.num_experts, -1, inputs[0].shape[-1])
        routed = routed[:, keep.to(routed.device)]
        for expert in range(experts.num_experts):
            token = routed[expert].any(-1).nonzero().reshape(-1)
            if len(token):
                yield expert, routed.new_ones(len(token)), self.expert_output(experts, routed[expert, token], expert)

    def routed_hidden(self, experts, hidden, weights, expert: int):
        """The router scales the expert's input: the down projection sees h(s x), weight 1."""
        return self.expert_hidden(experts, weights[:, None].to(hidden.dtype) * hidden, expert)

    def expert_hidden(self, experts, hidden, expert: int):
        """act(G x) * (U x) of one expert, its fused weights transposed (gate columns first)."""
        gate, up = (hidden @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def routed_scale(self, config, stats, position: int) -> float:
        """Each chosen expert adds its whole output: the merged block counts k times."""
        return float(self.top_k(config))

    def routed_input_scale(self, config, stats, position: int) -> float:
        """The calibrated mean router score of a chosen expert, c (folded into gate and up)."""
        return float(stats.mean_gate[position].sum()) / self.top_k(config)

    def fixed_gate(self, config, stats, position: int, expert: int) -> tuple[float, float]:
        """Expert e alone at a fixed gate (concat): the MoE adds E_e(s_e x) on the tokens that
        choose e, so its fixed form is f_e E_e(c_e x): its output counted once per choosing token,
        f_e its selection frequency (down scale), c_e its mean score over those tokens (input
        scale, folded into gate and up; the layer's mean where no token chose it, f_e being 0)."""
        selected = float(stats.selected[position, expert])
        if selected == 0:
            return 0.0, self.routed_input_scale(config, stats, position)
        return float(stats.selection_frequency[position, expert]), float(stats.gate_sum[position, expert]) / selected

    def dense_block(self, dense: torch.nn.Module) -> torch.nn.Module:
        return _WithRouterLogits(dense)


LLAMA4_TEXT = Llama4Family(
    name="llama4_text",
    model_types=("llama4_text",),
    keys=ConfigKeys(experts="num_local_experts", expert_width="intermediate_size", dense_width="intermediate_size_mlp"),
    layouts=(EXPERTS,),
    renormalize=False,  # the router's scores are calibrated: routed_input_scale
    contributions_in_forward=False,  # its experts take inputs scaled by the router (not linear in the weights)
    sparse_layers=SparseLayers(sparse_list="moe_layers"),
    shared=SharedExperts(
        gate="{block}.shared_expert.gate_proj.weight",
        up="{block}.shared_expert.up_proj.weight",
        down="{block}.shared_expert.down_proj.weight",
        width="intermediate_size",
    ),
    router_module_path="model.layers.{layer}.feed_forward.router",
    # a smaller MoE is written in the fused layout; pruning keeps the router's input scaling exact
    moe_architecture="Llama4ForCausalLM",
    dense=DenseTarget(
        transformers.Llama4TextConfig,
        "Llama4ForCausalLM",
        {p: f"model.layers.{{layer}}.feed_forward.{p}_proj.weight" for p in ("gate", "up", "down")},
        overrides=_all_dense,
        width_key="intermediate_size_mlp",
    ),
)

LLAMA4_MULTIMODAL = TextPart(
    model_type="llama4",
    prefixes=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    dropped="the vision tower (vision_model.*, multi_modal_projector.*)",
)
