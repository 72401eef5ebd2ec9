# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A family adapter: one declarative table (`MoEFamily(...)`) read by generic code.

A family knows where each expert's projections live (in every checkpoint layout
it has), where the router module sits for calibration hooks, what its top-k
weights sum to, and how to build the dense target config. All of that is data
(`spec.py`); the methods below are the one implementation every family shares.
A family whose computation differs (an activation, a router output) subclasses
`MoEFamily` and overrides only that method. Everything else (methods, planning,
calibration) is family-agnostic.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import transformers

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families.spec import (
    ConfigKeys,
    DenseTarget,
    ExpertSlice,
    FusedLayout,
    Layout,
    PerExpertLayout,
    Refusal,
    Shape,
    SharedExperts,
    SparseLayers,
    copied_values,
    target_values,
    template_regex,
)

if TYPE_CHECKING:
    from mergekit_moe2dense.statistics import RouterStatistics

PROJECTIONS = ("gate", "up", "down")


class UnsupportedModelError(Moe2DenseError, ValueError):
    """The model is not an MoE, or its family has no adapter yet."""


@dataclass(frozen=True)
class MoELayer:
    """The tensors of one sparse MLP block, resolved against a checkpoint."""

    index: int
    # experts[e][proj] for proj in PROJECTIONS, as weights of nn.Linear: gate/up [I, H], down [H, I]
    experts: tuple[dict[str, ExpertSlice], ...]
    router: str
    # every checkpoint tensor of the block: none of them is copied to the output
    consumed: tuple[str, ...]
    # always-on experts (Qwen2-MoE, DeepSeek), same projection layout as `experts`
    shared_experts: tuple[dict[str, ExpertSlice], ...] = ()
    # in-memory tensor name -> checkpoint name, for the block's extra tensors stored under
    # another name in this layout (the layer-streaming engine fills the module from them)
    renamed: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return len(self.experts)


@dataclass(frozen=True, eq=False)
class MoEFamily:
    """Adapter for one MoE architecture family, as a table.

    `layouts` are tried in order per layer (the first whose marker tensor is
    stored wins); the first `PerExpertLayout` (else the first layout, fused) names the
    tensors of a rebuilt smaller MoE (`moe_layout`). `renormalize` says whether the
    router divides its top-k weights by their sum: always (True), never (False) or per
    config key; `routed_scaling` is the config key of a factor the router multiplies
    them by (DeepSeek).
    """

    name: str
    model_types: tuple[str, ...]
    keys: ConfigKeys
    layouts: tuple[Layout, ...]
    dense: DenseTarget
    renormalize: bool | str = "norm_topk_prob"
    routed_scaling: str | None = None
    sparse_layers: SparseLayers = SparseLayers()
    shared: SharedExperts | None = None
    # further tensors of the sparse block (router bias, shared gate) with their shapes: not copied.
    # Named as in the transformers model ({block}: the router module's parent); a layout whose
    # names differ maps them (`extras`)
    extra_tensors: Mapping[str, Shape] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    # module path ({layer}) of the router in the transformers model, for hooks
    router_module_path: str = "model.layers.{layer}.mlp.gate"
    # the MoE class a smaller rebuilt MoE is saved as (None: rebuilding is not supported)
    moe_architecture: str | None = None
    # the fused layout transformers keeps the experts in, where it is not the family's first
    # stored fused layout (Granite stores `input_linear`, holds `experts.gate_up_proj`)
    memory: FusedLayout | None = None
    # config keys of group-limited routing (groups, groups chosen per token; DeepSeek): a smaller MoE
    # with other experts routes in one group (plain top-k), its experts being in no old group
    routing_groups: tuple[str, str] | None = None
    # tensor-name prefix ({layer}) of a decoder layer, where checkpoints store layers past the
    # last one that transformers does not build (DeepSeek-V3's and GLM-4.5's multi-token-prediction
    # layers, `model.layers.{num_hidden_layers}.*`): those are not part of the model, not copied
    unbuilt_layers: str | None = None
    # whether the experts module's forward(hidden, top-k index, top-k weights) is linear in the
    # weights (the block adds sum_k w_k y_k): calibration then records each chosen expert's
    # output in that forward (`RouterRecorder`) instead of recomputing it (`expert_contributions`)
    contributions_in_forward: bool = True

    @property
    def balanced_by_bias(self) -> bool:
        """Whether the router chooses with a load-balancing bias (`e_score_correction_bias`,
        DeepSeek-V3's auxiliary-loss-free balancing), which evens out how often each expert is used."""
        return any(name.endswith("e_score_correction_bias") for name in self.extra_tensors)

    def supports(self, config: transformers.PretrainedConfig) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    # -- config semantics -------------------------------------------------------------
    def num_experts(self, config: transformers.PretrainedConfig) -> int:
        return getattr(config, self.keys.experts) or 0

    def top_k(self, config: transformers.PretrainedConfig) -> int:
        return getattr(config, self.keys.top_k)

    def expert_width(self, config: transformers.PretrainedConfig) -> int:
        return getattr(config, self.keys.expert_width)

    def moe_layer_indices(self, config: transformers.PretrainedConfig) -> list[int]:
        """Decoder layers whose MLP is sparse."""
        return self.sparse_layers.layers(config, self.num_experts(config))

    def has_shared(self, config: transformers.PretrainedConfig) -> bool:
        return self.shared is not None and self.shared.present(config)

    def unsupported_reason(self, config: transformers.PretrainedConfig) -> str | None:
        """Why this particular config of the family cannot be converted exactly (None: it can)."""
        return next((refusal.reason for refusal in self.refusals if refusal.applies(config)), None)

    def renormalizes(self, config: transformers.PretrainedConfig) -> bool:
        """Whether the router divides its top-k weights by their sum."""
        if isinstance(self.renormalize, bool):
            return self.renormalize
        return bool(getattr(config, self.renormalize, False))

    def needs_statistics(self, config: transformers.PretrainedConfig) -> bool:
        """Whether the dense weights need calibration whatever the method (calibrated scales)."""
        gated = self.has_shared(config) and self.shared.gate_module is not None
        return gated or not self.renormalizes(config)

    def routed_scale(
        self, config: transformers.PretrainedConfig, stats: RouterStatistics | None, position: int
    ) -> float:
        """Mean per-token total weight of the routed mixture in MoE layer `position`.

        The MoE adds sum_k g_k E_k(x); a merged block stands for sum_k g_k with
        weights summing to 1, so its down projection is scaled by E_t[sum_k g_k].
        With renormalised top-k weights that is 1 (Mixtral), or the routed scaling
        factor (DeepSeek-V3); otherwise its mean as recorded from the router's own
        top-k weights (which include any scaling factor).
        """
        if self.renormalizes(config):
            return float(getattr(config, self.routed_scaling)) if self.routed_scaling else 1.0
        return float(stats.mean_gate[position].sum())

    def routed_input_scale(
        self, config: transformers.PretrainedConfig, stats: RouterStatistics | None, position: int
    ) -> float:
        """Factor on the routed block's input, folded into its gate and up rows: 1 where the
        router weighs the experts' outputs (every family but Llama 4)."""
        return 1.0

    def fixed_gate(
        self, config: transformers.PretrainedConfig, stats: RouterStatistics | None, position: int, expert: int
    ) -> tuple[float, float]:
        """(down scale, input scale) of routed expert `expert` alone at a fixed gate (concat): the
        MoE with its router replaced by the calibrated mean adds gbar_e E_e(x), gbar_e the mean
        over all tokens of e's top-k weight (0 where not chosen). That mean is the router's own
        output, so it already holds what `routed_scale` stands for (a top-k sum that is not 1,
        DeepSeek's routed_scaling_factor): counted once, never times `routed_scale` again."""
        return float(stats.mean_gate[position, expert]), 1.0

    def shared_scale(
        self, config: transformers.PretrainedConfig, stats: RouterStatistics | None, position: int
    ) -> float:
        """Scale of the shared experts' down projection: 1, or the calibrated mean of their gate."""
        if self.shared_gate_module(0) is None:
            return 1.0
        return float(stats.mean_shared_gate[position])

    def dense_layer_width(self, config: transformers.PretrainedConfig) -> int | None:
        """Intermediate size of decoder layers that are dense already (None: there are none)."""
        dense = len(self.moe_layer_indices(config)) < config.num_hidden_layers
        return getattr(config, self.keys.dense_width) if dense else None

    # -- the transformers model, for calibration hooks ----------------------------------
    def router_module(self, layer: int) -> str:
        """Module path of the router in the transformers model, for hooks."""
        return self.router_module_path.format(layer=layer)

    def experts_module(self, layer: int) -> str:
        """Module path of the fused experts (transformers 5 keeps `gate_up_proj`
        [E, 2I, H], gate rows first, and `down_proj` [E, H, I]), a sibling of the router."""
        return self.router_module(layer).rsplit(".", 1)[0] + ".experts"

    def memory_layout(self) -> FusedLayout:
        """The fused layout transformers keeps the experts in (names and orientation, under
        `experts_module`): what the layer stream fills from whichever layout is stored."""
        fused = self.memory or next((layout for layout in self.layouts if isinstance(layout, FusedLayout)), None)
        return fused or FusedLayout(block="", gate_up="gate_up_proj", down="down_proj", router="")

    def shared_module(self, config: transformers.PretrainedConfig, layer: int) -> str | None:
        """Module path of shared experts that sit beside the sparse block rather than inside it
        (their output is part of what the dense MLP replaces; None: inside, or none)."""
        if not self.has_shared(config) or self.shared.module is None:
            return None
        return self.shared.module.format(layer=layer)

    def shared_gate_module(self, layer: int) -> str | None:
        """Module path of a per-token gate on the shared experts, for hooks (None: ungated)."""
        if self.shared is None or self.shared.gate_module is None:
            return None
        return self.shared.gate_module.format(layer=layer)

    def expert_output(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's output [T, H] on tokens [T, H], from the fused experts module:
        down (act(gate x) * up x), as transformers' fused experts compute it."""
        return torch.nn.functional.linear(self.expert_hidden(experts, hidden, expert), experts.down_proj[expert])

    def expert_hidden(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's activations before its down projection, h = act(G x) * (U x) [T, I], on
        tokens [T, H], from the fused experts module (its output is down_proj[expert] h)."""
        gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def routed_hidden(
        self, experts: torch.nn.Module, hidden: torch.Tensor, weights: torch.Tensor, expert: int
    ) -> torch.Tensor:
        """What a routed expert's down projection sees in the block, per token [T, I], given the
        router's weights [T] for it: g h(x), the block adding D g h(x) (plus g times a down bias,
        which no down re-fit changes). The re-fit of a smaller MoE is linear in D on these."""
        return weights[:, None] * self.expert_hidden(experts, hidden, expert)

    def expert_contributions(self, experts: torch.nn.Module, inputs: tuple, keep: torch.Tensor):
        """(expert, top-k weights [n], outputs [n, H]) per routed expert, for the non-padding
        tokens (`keep`) it was given, from the fused experts module's inputs (hidden,
        top-k indices, top-k weights), as transformers' fused experts take them."""
        hidden, top_k_index, top_k_weights = inputs[:3]
        keep = keep.to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
        index = top_k_index.reshape(keep.shape[0], -1)[keep]
        weights = top_k_weights.reshape(keep.shape[0], -1)[keep]
        for expert in index.unique().tolist():
            token, slot = (index == expert).nonzero(as_tuple=True)
            yield expert, weights[token, slot], self.expert_output(experts, hidden[token], expert)

    def router_outputs(self, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], top-k weights [T, k], top-k indices [T, k]) from the router's output."""
        logits, top_k_weights, top_k_index = output
        return logits, top_k_weights, top_k_index

    def shared_gate_values(self, output: torch.Tensor) -> torch.Tensor:
        """Per-token multiplier of the shared experts from the gate module's output (a sigmoid gate)."""
        return torch.sigmoid(output.float()).reshape(-1)

    def dense_hidden(self, experts: torch.nn.Module, layer: int):
        """The re-fit's h(x, projections) of a dense MLP given as projections and biases
        (`refit.Hidden`), where the family's experts are not act(G x) * (U x) with the experts
        module's `act_fn` (None: they are; the re-fit computes that itself)."""
        return None

    def one_expert(self, experts: torch.nn.Module, layer: int, projections: Mapping[str, torch.Tensor]):
        """A dense MLP's projections and biases (`gate` [I, H], ..., `down_bias` [H]) as expert 0
        of a fused experts module in the family's in-memory layout (transposed, interleaved: its
        slices), built differentiably, so that `expert_hidden(view, x, 0)` is the family's own
        computation on them; the rest (the activation, GPT-OSS's `_apply_gate`) is `experts`'."""
        return _OneExpert(experts, self.memory_layout(), layer, projections)

    def dense_block(self, dense: torch.nn.Module) -> torch.nn.Module:
        """The module that stands in for the sparse block in its decoder layer (the re-fit's
        dense MLP), returning what the block returns (here: the output alone)."""
        return dense

    def unbuilt_tensors(self, config: transformers.PretrainedConfig, tensor_names: Collection[str]) -> set[str]:
        """Stored tensors that are not part of the model (`unbuilt_layers`): not copied."""
        if self.unbuilt_layers is None:
            return set()
        pattern = template_regex(self.unbuilt_layers)
        unbuilt = set()
        for name in tensor_names:
            match = pattern.match(name)
            if match and int(match["layer"]) >= config.num_hidden_layers:
                unbuilt.add(name)
        return unbuilt

    # -- the checkpoint -------------------------------------------------------------
    def layout_of(self, layer: int, tensor_names: Collection[str]) -> Layout:
        """The layout `layer` is stored in."""
        for layout in self.layouts:
            if layout.marker(layer) in tensor_names:
                return layout
        raise _missing(layer, f"{self.name} expert tensors", tensor_names)

    def resolve_layer(
        self, config: transformers.PretrainedConfig, layer: int, tensor_names: Collection[str]
    ) -> MoELayer:
        """Locate a layer's expert tensors in whichever layout the checkpoint uses.

        Only the marker, router, shared and extra tensors are checked here; every
        expert tensor and every shape is checked against the shard headers when the
        source is opened (`io.checks.check_shapes`)."""
        layout = self.layout_of(layer, tensor_names)
        experts = layout.slices(layer, self.num_experts(config), self.expert_width(config))
        router = layout.tensor(layout.router, layer)
        shared = (self._shared_slices(config, layout, layer),) if self.has_shared(config) else ()
        extra = {self.extra_tensor(t, layer): layout.extra(t, layer) for t in self.extra_tensors}
        for name in [router, *(s.tensor for block in shared for s in block.values()), *extra.values()]:
            if name not in tensor_names:
                raise _missing(layer, name, tensor_names)
        consumed = {s.tensor for block in experts + shared for s in block.values()} | {router, *extra.values()}
        renamed = {memory: stored for memory, stored in extra.items() if memory != stored}
        return MoELayer(layer, experts, router, tuple(sorted(consumed)), shared_experts=shared, renamed=renamed)

    def _shared_slices(self, config, layout: Layout, layer: int) -> dict[str, ExpertSlice]:
        shared = self.shared
        if shared.fused_gate_up:
            gate_up, width = layout.tensor(shared.gate, layer), shared.total_width(config)
            return {
                "gate": ExpertSlice(gate_up, rows=(0, width)),
                "up": ExpertSlice(gate_up, rows=(width, 2 * width)),
                "down": ExpertSlice(layout.tensor(shared.down, layer)),
            }
        templates = {"gate": shared.gate, "up": shared.up, "down": shared.down}
        return {p: ExpertSlice(layout.tensor(t, layer)) for p, t in templates.items()}

    def extra_tensor(self, template: str, layer: int) -> str:
        """The in-memory name of one of the block's extra tensors (the block being the
        router module's parent in the transformers model)."""
        return template.format(layer=layer, block=self.router_module(layer).rsplit(".", 1)[0])

    def expected_shapes(
        self, config: transformers.PretrainedConfig, layer: MoELayer, tensor_names: Collection[str]
    ) -> dict[str, tuple[int, ...]]:
        """Every tensor of a resolved sparse layer with the full shape config.json implies
        (experts first, then router, shared experts, extras)."""
        layout = self.layout_of(layer.index, tensor_names)
        num_experts = self.num_experts(config)
        shapes: dict[str, Shape] = dict(layout.expert_shapes(layer.index, num_experts))
        shapes[layer.router] = ("E", "H")
        if layer.shared_experts:
            block = layer.shared_experts[0]
            if self.shared.fused_gate_up:
                shapes[block["gate"].tensor] = ("2S", "H")
            else:
                shapes.update({block["gate"].tensor: ("S", "H"), block["up"].tensor: ("S", "H")})
            shapes[block["down"].tensor] = ("H", "S")
        shapes.update({layout.extra(t, layer.index): shape for t, shape in self.extra_tensors.items()})
        dims = self.dims(config)
        return {name: tuple(dims[d] if isinstance(d, str) else d for d in shape) for name, shape in shapes.items()}

    def stored_experts(self, tensor_names: Collection[str]) -> dict[int, dict[int, str]]:
        """layer -> expert index -> one of its tensors, for experts stored under per-expert
        names (fused layouts: their E dim says, checked with their shapes)."""
        found: dict[int, dict[int, str]] = {}
        for layout in self.layouts:
            for layer, experts in layout.stored_experts(tensor_names).items():
                for expert, name in experts.items():
                    found.setdefault(layer, {}).setdefault(expert, name)
        return found

    def dims(self, config: transformers.PretrainedConfig) -> dict[str, int]:
        """The symbolic dims of the table's shapes, from config.json."""
        width = self.expert_width(config)
        dims = {"E": self.num_experts(config), "H": getattr(config, self.keys.hidden), "I": width, "2I": 2 * width}
        if self.has_shared(config):
            dims["S"] = self.shared.total_width(config)
            dims["2S"] = 2 * dims["S"]
        return dims

    def describe_dims(self, config: transformers.PretrainedConfig) -> str:
        """The config keys behind the dims, for error messages."""
        keys = [self.keys.experts, self.keys.expert_width, self.keys.hidden]
        if self.has_shared(config):
            keys += [k for k in (self.shared.width, self.shared.count) if k]
        return ", ".join(f"{key}: {getattr(config, key)}" for key in keys)

    # -- the dense target -------------------------------------------------------------
    def dense_mlp_names(self, layer: int, projections: Collection[str] = PROJECTIONS) -> dict[str, str]:
        """Output tensor names of the dense MLP, keyed by projection (also the source names
        of the MLPs of layers that are dense already); the biases (`gate_bias`, ...) of a target
        that has them where asked (the re-fit's names for them: GPT-OSS writes them fused)."""
        return {p: self.dense.mlp[p].format(layer=layer) for p in projections if p in self.dense.mlp}

    def dense_zero_tensors(self, config: transformers.PretrainedConfig, layer: int) -> dict[str, tuple[int, ...]]:
        """Extra all-zero tensors the dense target needs per converted layer (name -> shape)."""
        dims = self.dims(config)
        return {
            name.format(layer=layer): tuple(dims[d] if isinstance(d, str) else d for d in shape)
            for name, shape in self.dense.zero_tensors.items()
        }

    def dense_config(
        self, config: transformers.PretrainedConfig, intermediate_size: int
    ) -> transformers.PretrainedConfig:
        """The dense target config: every setting the target class knows, kept; no MoE keys,
        no remote code (`auto_map`), nothing the target class does not know."""
        values = target_values(config, self.dense.config_class, drop=self.dense.moe_keys)
        values.update(self.dense.overrides(config))
        values[self.dense.width_key] = intermediate_size
        dense = self.dense.config_class(**values)
        dense.architectures = [self.dense.architecture]
        return dense

    # -- a smaller MoE of the same family (prune_experts, merge_experts, kmeans output: moe) ----
    def moe_config(
        self, config: transformers.PretrainedConfig, num_experts: int, top_k: int
    ) -> transformers.PretrainedConfig:
        """The config of a smaller MoE of the same family: `num_experts` routed experts per
        MoE layer, `top_k` per token, everything else as the source's (shared experts kept).
        Group-limited routing is reset to one group when the expert count changes."""
        self._check_rebuild()
        moe = type(config)(**copied_values(config))
        # set as attributes: each config class's attribute_map names the stored key
        setattr(moe, self.keys.experts, num_experts)
        setattr(moe, self.keys.top_k, top_k)
        if self.routing_groups is not None and num_experts != self.num_experts(config):
            for key in self.routing_groups:
                setattr(moe, key, 1)
        moe.architectures = [self.moe_architecture]
        return moe

    def moe_layout(self) -> Layout:
        """The checkpoint layout a smaller MoE is written in: the first per-expert one (what
        `save_pretrained` writes), else the family's first fused one (GPT-OSS, Llama 4, Granite:
        the layout their checkpoints ship in)."""
        self._check_rebuild()
        per_expert = [layout for layout in self.layouts if isinstance(layout, PerExpertLayout)]
        return (per_expert or list(self.layouts))[0]

    def moe_expert_slices(self, layer: int, num_experts: int, width: int) -> tuple[dict[str, ExpertSlice], ...]:
        """Where each of the smaller MoE's `num_experts` experts of `layer` is written, by projection
        (expert biases included): whole tensors of a per-expert layout, or slices of fused ones,
        which the graph stacks from the N experts (`graph.FuseExpert`)."""
        return self.moe_layout().slices(layer, num_experts, width)

    def moe_router_name(self, layer: int) -> str:
        """Output tensor name of the smaller MoE's router weight [E, H]."""
        layout = self.moe_layout()
        return layout.tensor(layout.router, layer)

    def moe_block_tensors(
        self, config: transformers.PretrainedConfig, layer: int, tensor_names: Collection[str]
    ) -> list[tuple[str, str, int | None]]:
        """The sparse block's tensors other than its routed experts, as (source name, name in the
        smaller MoE, the dim that indexes the routed experts or None): the router, the extra tensors
        (router biases, correction biases [E] or ERNIE's statistics [1, E], shared-expert gates)
        and the shared experts. Tensors indexed by expert are rebuilt for the new experts; the
        others are copied unchanged."""
        source, target = self.layout_of(layer, tensor_names), self.moe_layout()
        found = [(source.tensor(source.router, layer), target.tensor(target.router, layer), 0)]
        for template, shape in self.extra_tensors.items():
            axis = list(shape).index("E") if "E" in shape else None
            found.append((source.extra(template, layer), target.extra(template, layer), axis))
        if self.has_shared(config):
            templates = dict.fromkeys((self.shared.gate, self.shared.up, self.shared.down))  # Granite: gate is up
            found += [(source.tensor(t, layer), target.tensor(t, layer), None) for t in templates]
        return found

    def _check_rebuild(self) -> None:
        if self.moe_architecture is None:
            raise UnsupportedModelError(
                f"{self.name}: rebuilding a smaller MoE (output: moe, prune_experts, merge_experts) is not "
                "supported: the family names no MoE class to write"
            )


class _OneExpert:
    """`MoEFamily.one_expert`: the fused tensors (attributes named as the experts module's) of one
    expert, filled from the projections through the layout's slices; other attributes: `experts`'."""

    def __init__(self, experts: torch.nn.Module, layout: FusedLayout, layer: int, projections) -> None:
        width, hidden = projections["gate"].shape
        dims = {"E": 1, "H": hidden, "I": width, "2I": 2 * width}
        zeros = projections["gate"].new_zeros
        tensors = {
            name.rsplit(".", 1)[-1]: zeros([dims[d] for d in shape])
            for name, shape in layout.expert_shapes(layer, 1).items()
        }
        for projection, piece in layout.slices(layer, 1, width)[0].items():
            if projection in projections:
                piece.take(tensors[piece.tensor.rsplit(".", 1)[-1]]).copy_(projections[projection])
        self.__dict__.update(tensors, _experts=experts)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_experts"], name)


def _missing(layer: int, what: str, names: Collection[str]) -> UnsupportedModelError:
    sample = ", ".join(sorted(n for n in names if f".{layer}." in n)[:6])
    return UnsupportedModelError(f"layer {layer}: cannot find {what} in the checkpoint (found e.g. {sample})")
