# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The interface every MoE family adapter implements.

A family knows three things about its checkpoints: where each expert's
projections live (in both the per-expert and the fused layout), where the router
module sits for calibration hooks, and how to build the dense target config.
Everything else (methods, planning, calibration) is family-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Collection, Dict, List, Optional, Tuple

import torch
import transformers

from mergekit_moe2dense.errors import Moe2DenseError

if TYPE_CHECKING:
    from mergekit_moe2dense.calibration.stats import RouterStatistics

PROJECTIONS = ("gate", "up", "down")


class UnsupportedModelError(Moe2DenseError, ValueError):
    """The model is not an MoE, or its family has no adapter yet."""


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's projection inside a checkpoint tensor.

    `expert` indexes dim 0 of a fused `[E, ...]` tensor (None: the tensor holds
    one expert); `rows` selects a row range (fused gate_up keeps gate rows first).
    """

    tensor: str
    expert: Optional[int] = None
    rows: Optional[Tuple[int, int]] = None

    def take(self, value: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            value = value[self.expert]
        if self.rows is not None:
            value = value[self.rows[0] : self.rows[1]]
        return value


@dataclass(frozen=True)
class MoELayer:
    """The tensors of one sparse MLP block, resolved against a checkpoint."""

    index: int
    # experts[e][proj] for proj in PROJECTIONS, as weights of nn.Linear: gate/up [I, H], down [H, I]
    experts: Tuple[Dict[str, ExpertSlice], ...]
    router: str
    # every checkpoint tensor of the block: none of them is copied to the output
    consumed: Tuple[str, ...]
    # always-on experts (Qwen2-MoE, DeepSeek), same projection layout as `experts`
    shared_experts: Tuple[Dict[str, ExpertSlice], ...] = ()

    @property
    def num_experts(self) -> int:
        return len(self.experts)


class MoEFamily(ABC):
    """Adapter for one MoE architecture family."""

    name: ClassVar[str]
    model_types: ClassVar[Tuple[str, ...]]

    def supports(self, config: transformers.PretrainedConfig) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    # Defaults below fit the transformers 5 MoE classes (router `mlp.gate`, returning
    # logits, top-k weights and indices); families override what differs.
    def moe_layer_indices(self, config: transformers.PretrainedConfig) -> List[int]:
        """Decoder layers whose MLP is sparse."""
        return list(range(config.num_hidden_layers))

    @abstractmethod
    def num_experts(self, config: transformers.PretrainedConfig) -> int: ...

    def top_k(self, config: transformers.PretrainedConfig) -> int:
        return config.num_experts_per_tok

    def router_module(self, layer: int) -> str:
        """Module path of the router in the transformers model, for hooks."""
        return f"model.layers.{layer}.mlp.gate"

    def experts_module(self, layer: int) -> str:
        """Module path of the fused experts (transformers 5 keeps `gate_up_proj`
        [E, 2I, H], gate rows first, and `down_proj` [E, H, I]), a sibling of the router."""
        return self.router_module(layer).rsplit(".", 1)[0] + ".experts"

    def expert_output(self, experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's output [T, H] on tokens [T, H], from the fused experts module:
        down (act(gate x) * up x), as transformers' fused experts compute it."""
        gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

    def router_outputs(self, output) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], top-k weights [T, k], top-k indices [T, k]) from the router's output."""
        logits, top_k_weights, top_k_index = output
        return logits, top_k_weights, top_k_index

    @abstractmethod
    def resolve_layer(
        self,
        config: transformers.PretrainedConfig,
        layer: int,
        tensor_names: Collection[str],
    ) -> MoELayer:
        """Locate a layer's expert tensors in whichever layout the checkpoint uses."""

    @abstractmethod
    def dense_mlp_names(self, layer: int) -> Dict[str, str]:
        """Output tensor names of the dense MLP, keyed by projection."""

    @abstractmethod
    def dense_config(
        self, config: transformers.PretrainedConfig, intermediate_size: int
    ) -> transformers.PretrainedConfig:
        """The dense target config: every attention/norm setting kept, no MoE keys."""

    # -- optional: what differs between families beyond tensor names --------------
    def unsupported_reason(self, config: transformers.PretrainedConfig) -> Optional[str]:
        """Why this particular config of the family cannot be converted exactly (None: it can)."""
        return None

    def needs_statistics(self, config: transformers.PretrainedConfig) -> bool:
        """Whether the dense weights need calibration whatever the method (calibrated scales)."""
        return False

    def routed_scale(
        self, config: transformers.PretrainedConfig, stats: Optional["RouterStatistics"], position: int
    ) -> float:
        """Mean per-token total weight of the routed mixture in MoE layer `position`.

        The MoE adds sum_k g_k E_k(x); a merged block stands for sum_k g_k with
        weights summing to 1, so its down projection is scaled by E_t[sum_k g_k].
        That is 1 where top-k weights are renormalised (Mixtral).
        """
        return 1.0

    def shared_gate_module(self, layer: int) -> Optional[str]:
        """Module path of a per-token gate on the shared experts, for hooks (None: ungated)."""
        return None

    def shared_gate_values(self, output: torch.Tensor) -> torch.Tensor:
        """Per-token multiplier of the shared experts from the gate module's output (a sigmoid gate)."""
        return torch.sigmoid(output.float()).reshape(-1)

    def shared_scale(
        self, config: transformers.PretrainedConfig, stats: Optional["RouterStatistics"], position: int
    ) -> float:
        """Scale of the shared experts' down projection: 1, or the calibrated mean of their gate."""
        return 1.0

    def dense_layer_width(self, config: transformers.PretrainedConfig) -> Optional[int]:
        """Intermediate size of decoder layers that are dense already (None: there are none)."""
        return None

    def dense_zero_tensors(self, config: transformers.PretrainedConfig, layer: int) -> Dict[str, Tuple[int, ...]]:
        """Extra all-zero tensors the dense target needs per converted layer (name -> shape)."""
        return {}

    def moe_config(
        self, config: transformers.PretrainedConfig, num_experts: int, top_k: int
    ) -> transformers.PretrainedConfig:
        """A smaller MoE of the same family (used to reassemble merged experts)."""
        raise UnsupportedModelError(
            f"{self.name}: rebuilding a smaller MoE is not supported"
        )

    def moe_expert_names(self, layer: int, expert: int) -> Dict[str, str]:
        """Output tensor names of one expert of the smaller MoE, keyed by projection."""
        raise UnsupportedModelError(f"{self.name}: rebuilding a smaller MoE is not supported")

    def moe_router_name(self, layer: int) -> str:
        """Output tensor name of the smaller MoE's router weight [E, H]."""
        raise UnsupportedModelError(f"{self.name}: rebuilding a smaller MoE is not supported")


def _missing(layer: int, what: str, names: Collection[str]) -> UnsupportedModelError:
    sample = ", ".join(sorted(n for n in names if f".{layer}." in n)[:6])
    return UnsupportedModelError(
        f"layer {layer}: cannot find {what} in the checkpoint (found e.g. {sample})"
    )
