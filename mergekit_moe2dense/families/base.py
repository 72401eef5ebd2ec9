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
from typing import ClassVar, Collection, Dict, List, Optional, Tuple

import torch
import transformers

from mergekit_moe2dense.errors import Moe2DenseError

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

    @abstractmethod
    def moe_layer_indices(self, config: transformers.PretrainedConfig) -> List[int]:
        """Decoder layers whose MLP is sparse."""

    @abstractmethod
    def num_experts(self, config: transformers.PretrainedConfig) -> int: ...

    @abstractmethod
    def top_k(self, config: transformers.PretrainedConfig) -> int: ...

    @abstractmethod
    def router_module(self, layer: int) -> str:
        """Module path of the router in the transformers model, for hooks."""

    def experts_module(self, layer: int) -> str:
        """Module path of the fused experts (transformers 5 keeps `gate_up_proj`
        [E, 2I, H], gate rows first, and `down_proj` [E, H, I]), a sibling of the router."""
        return self.router_module(layer).rsplit(".", 1)[0] + ".experts"

    @abstractmethod
    def router_outputs(
        self, output
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], top-k weights [T, k], top-k indices [T, k]) from the router's output."""

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

    def moe_config(
        self, config: transformers.PretrainedConfig, num_experts: int, top_k: int
    ) -> transformers.PretrainedConfig:
        """A smaller MoE of the same family (used to reassemble merged experts)."""
        raise UnsupportedModelError(
            f"{self.name}: rebuilding a smaller MoE is not supported"
        )


def _missing(layer: int, what: str, names: Collection[str]) -> UnsupportedModelError:
    sample = ", ".join(sorted(n for n in names if f".{layer}." in n)[:6])
    return UnsupportedModelError(
        f"layer {layer}: cannot find {what} in the checkpoint (found e.g. {sample})"
    )
