# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The declarative parts of a family adapter: where tensors live and what config keys mean.

Tensor names are templates formatted with `layer`, `block` (the sparse block's
prefix in the layout found, e.g. `model.layers.3.mlp`) and, for per-expert
tensors, `expert`. Shapes use symbolic dims: "E" (routed experts), "H" (hidden
size), "I" (one routed expert's width), "2I", "S" (the shared
experts' width), or ints. Everything here is data; the
one generic resolver and the shape expectations are in `base.MoEFamily`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import transformers

Dim = int | str
Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's projection inside a checkpoint tensor.

    `expert` indexes dim 0 of a fused `[E, ...]` tensor (None: the tensor holds
    one expert); `transposed` says the expert's matrix is stored `[in, out]`
    (GPT-OSS, Llama 4), so it is transposed first; `rows` then selects a row range
    (fused gate_up keeps gate rows first), every `step`-th row (interleaved gate/up
    rows: step 2).
    `units` reorders the expert's hidden units (alignment.py): unit i of the result
    is stored unit units[i], along dim 0 of gate/up [I, H] and dim 1 of down [H, I]
    (`unit_dim`). A permuted expert computes the same function.
    """

    tensor: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False
    step: int = 1
    units: tuple[int, ...] | None = None
    unit_dim: int = 0

    def take(self, value):
        if self.expert is not None:
            value = value[self.expert]
        return self.permute(self.within(value))

    def within(self, value):
        """The selection inside one expert's tensor (a view)."""
        if self.transposed:
            value = value.transpose(0, 1)
        if self.rows is not None:
            value = value[self.rows[0] : self.rows[1] : self.step]
        return value

    def permute(self, value):
        """`value` (this slice as stored) with its hidden units in `units` order."""
        if self.units is None:
            return value
        return value.index_select(self.unit_dim, torch.as_tensor(self.units, device=value.device))

    @property
    def stored(self) -> ExpertSlice:
        """The same slice without the permutation (what is read from the checkpoint)."""
        return dataclasses.replace(self, units=None, unit_dim=0)

    @property
    def contiguous(self) -> bool:
        """Whether the selected bytes are one contiguous range of the stored tensor."""
        return not self.transposed and self.step == 1


@dataclass(frozen=True)
class ConfigKeys:
    """config.json keys the conversion reads (names differ per family)."""

    experts: str  # number of routed experts E
    expert_width: str  # one routed expert's intermediate size I
    top_k: str = "num_experts_per_tok"
    dense_width: str = "intermediate_size"  # MLP width of layers that are dense in the MoE
    hidden: str = "hidden_size"


class _Layout:
    block: str  # the sparse block's prefix, from {layer}
    router: str  # [E, H]
    # the family's extra tensor templates (in-memory names) -> this layout's, where they differ
    extras: Mapping[str, str]

    def extra(self, template: str, layer: int) -> str:
        """The name of one of the family's extra tensors (`MoEFamily.extra_tensors`) in this layout."""
        return self.tensor(self.extras.get(template, template), layer)

    def tensor(self, template: str, layer: int, expert: int | None = None) -> str:
        """A tensor name of `layer` (and `expert`) from a template of this layout or the family."""
        return template.format(layer=layer, block=self.block.format(layer=layer), expert=expert)


@dataclass(frozen=True)
class PerExpertLayout(_Layout):
    """One tensor per expert and projection (what `save_pretrained` writes for most
    families, and most hub checkpoints), as nn.Linear weights: gate/up [I, H], down [H, I]."""

    block: str
    gate: str
    up: str
    down: str
    router: str
    extras: Mapping[str, str] = field(default_factory=dict, hash=False)  # a dict: not hashable
    kind: ClassVar[str] = "legacy"

    def marker(self, layer: int) -> str:
        """The tensor whose presence says `layer` is stored in this layout."""
        return self.tensor(self.gate, layer, 0)

    def slices(self, layer: int, num_experts: int, width: int) -> tuple[dict[str, ExpertSlice], ...]:
        return tuple(
            {p: ExpertSlice(self.tensor(t, layer, e)) for p, t in self.projections().items()}
            for e in range(num_experts)
        )

    def expert_shapes(self, layer: int, num_experts: int) -> dict[str, Shape]:
        """Every expert tensor of `layer` with its full stored shape."""
        shapes = {"gate": ("I", "H"), "up": ("I", "H"), "down": ("H", "I")}
        return {self.tensor(t, layer, e): shapes[p] for e in range(num_experts) for p, t in self.projections().items()}

    def stored_experts(self, tensor_names: Collection[str]) -> dict[int, dict[int, str]]:
        """layer -> expert index -> one tensor stored for it under these names (one pass)."""
        patterns = [template_regex(t.replace("{block}", self.block)) for t in self.projections().values()]
        found: dict[int, dict[int, str]] = {}
        for name in sorted(tensor_names):
            for pattern in patterns:
                match = pattern.fullmatch(name)
                if match:
                    found.setdefault(int(match["layer"]), {}).setdefault(int(match["expert"]), name)
                    break
        return found

    def projections(self) -> dict[str, str]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


@dataclass(frozen=True)
class FusedLayout(_Layout):
    """All experts of a block in two tensors (transformers 5's in-memory layout, which some
    checkpoints store): gate_up [E, 2I, H] with gate rows first, down [E, H, I].

    `transposed`: each expert's matrices are stored [in, out] (gate_up [E, H, 2I], down
    [E, I, H]: GPT-OSS, Llama 4); `interleaved`: gate and up alternate (gate at even
    positions: GPT-OSS); `gate_up_bias` [E, 2I] / `down_bias` [E, H]: expert biases, laid
    out as the rows of gate_up / down (the slices' projections `gate_bias`, `up_bias`,
    `down_bias`)."""

    block: str
    gate_up: str
    down: str
    router: str
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    extras: Mapping[str, str] = field(default_factory=dict, hash=False)  # a dict: not hashable
    kind: ClassVar[str] = "fused"

    def marker(self, layer: int) -> str:
        return self.tensor(self.gate_up, layer)

    def slices(self, layer: int, num_experts: int, width: int) -> tuple[dict[str, ExpertSlice], ...]:
        gate_up, down = self.tensor(self.gate_up, layer), self.tensor(self.down, layer)
        step = 2 if self.interleaved else 1
        rows = {
            "gate": (0, 2 * width) if self.interleaved else (0, width),
            "up": (1, 2 * width) if self.interleaved else (width, 2 * width),
        }
        experts = []
        for e in range(num_experts):
            expert = {p: ExpertSlice(gate_up, e, rows[p], self.transposed, step) for p in ("gate", "up")}
            expert["down"] = ExpertSlice(down, e, transposed=self.transposed)
            if self.gate_up_bias is not None:
                bias = self.tensor(self.gate_up_bias, layer)
                expert.update({f"{p}_bias": ExpertSlice(bias, e, rows[p], step=step) for p in ("gate", "up")})
            if self.down_bias is not None:
                expert["down_bias"] = ExpertSlice(self.tensor(self.down_bias, layer), e)
            experts.append(expert)
        return tuple(experts)

    def expert_shapes(self, layer: int, num_experts: int) -> dict[str, Shape]:
        gate_up, down = (("E", "H", "2I"), ("E", "I", "H")) if self.transposed else (("E", "2I", "H"), ("E", "H", "I"))
        shapes = {self.tensor(self.gate_up, layer): gate_up, self.tensor(self.down, layer): down}
        if self.gate_up_bias is not None:
            shapes[self.tensor(self.gate_up_bias, layer)] = ("E", "2I")
        if self.down_bias is not None:
            shapes[self.tensor(self.down_bias, layer)] = ("E", "H")
        return shapes

    def stored_experts(self, tensor_names: Collection[str]) -> dict[int, dict[int, str]]:
        return {}  # the E dim of the fused tensors says, checked with their shapes


Layout = PerExpertLayout | FusedLayout


@dataclass(frozen=True)
class SharedExperts:
    """Always-on experts added to the routed mixture, stored as one SwiGLU MLP
    (DeepSeek's n shared experts are one MLP n times as wide). With `fused_gate_up`,
    `gate` names one tensor [2S, H] whose gate rows come first and `up` is unused
    (Granite's `shared_mlp.input_linear`)."""

    gate: str
    up: str
    down: str
    width: str  # config key: one shared expert's width
    count: str | None = None  # config key: how many (0 or None: this config has none); None: always one
    # module path ({layer}) of a per-token sigmoid gate on their output, for hooks (None: ungated)
    gate_module: str | None = None
    fused_gate_up: bool = False
    # module path ({layer}) of the shared MLP where it sits beside the sparse block in the decoder
    # layer, on the same input, rather than inside it (Granite's `shared_mlp`); None: inside
    module: str | None = None

    def present(self, config) -> bool:
        """Whether this config has them: a count and a width that are not 0 (Granite's
        `shared_intermediate_size: 0` means none)."""
        counted = self.count is None or bool(getattr(config, self.count, None))
        return counted and bool(getattr(config, self.width, None))

    def total_width(self, config) -> int:
        return getattr(config, self.width) * (getattr(config, self.count) if self.count else 1)


@dataclass(frozen=True)
class SparseLayers:
    """Which decoder layers are sparse, by config keys (None: that rule does not apply).
    No layer is sparse when the expert count is 0 (some families' dense variants)."""

    first_dense: str | None = None  # layers below config[key] are dense (DeepSeek's first_k_dense_replace)
    step: str | None = None  # sparse only where (i + 1) % config[key] == 0 (Qwen's decoder_sparse_step)
    dense_list: str | None = None  # config[key] lists dense layers (Qwen's mlp_only_layers)
    last_sparse: str | None = None  # layers above config[key] are dense (ERNIE's moe_layer_end_index; -1: none)
    sparse_list: str | None = None  # config[key] lists the sparse layers (Llama 4's moe_layers)

    def layers(self, config, num_experts: int):
        if not num_experts:
            return []
        first = (getattr(config, self.first_dense) or 0) if self.first_dense else 0
        step = (getattr(config, self.step) or 1) if self.step else 1
        dense = set((getattr(config, self.dense_list) or ()) if self.dense_list else ())
        last = getattr(config, self.last_sparse) if self.last_sparse else None
        if last is None or last < 0:
            last = config.num_hidden_layers - 1
        if self.sparse_list:
            listed = set(getattr(config, self.sparse_list) or ())
            return [i for i in range(config.num_hidden_layers) if i in listed]
        return [
            i for i in range(config.num_hidden_layers) if first <= i <= last and (i + 1) % step == 0 and i not in dense
        ]


@dataclass(frozen=True)
class Refusal:
    """A config value of the family that has no exact dense equivalent: `value` is the
    refused truth value of config[key], or a test of the value (a per-layer list, ...)."""

    key: str
    value: bool | Callable[[Any], bool]
    reason: str

    def applies(self, config) -> bool:
        if callable(self.value):
            return bool(self.value(getattr(config, self.key, None)))
        return bool(getattr(config, self.key, False)) == self.value


@dataclass(frozen=True)
class TextPart:
    """The text model of a multimodal checkpoint (`model_type`), which converts as its text
    family: config.json's `text_config` is the text model's config, and its tensors are stored
    under other prefixes. `prefixes` maps each stored prefix to the text model's own (what
    transformers' text-only class of the family names them, e.g. `language_model.model.` ->
    `model.`); a stored tensor under none of them is no part of the text model and is not
    read (`dropped` says what that is, in words, for the log line). `multimodal: False`: a
    text-only model type whose checkpoints may store its tensors under such prefixes too (its
    config is the text model's)."""

    model_type: str
    prefixes: tuple[tuple[str, str], ...]
    dropped: str
    multimodal: bool = True

    def text_name(self, stored: str) -> str | None:
        """The text model's name of stored tensor `stored` (None: not part of the text model)."""
        for prefix, text in self.prefixes:
            if stored.startswith(prefix):
                return text + stored[len(prefix) :]
        return None


def _no_overrides(config) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class DenseTarget:
    """The dense model a converted MoE becomes.

    The config keeps the source's values for every key `config_class` knows (its
    defaults plus its attribute_map) except `moe_keys`; `overrides` computes the
    values that differ (the code where a family's target differs).
    """

    config_class: type
    architecture: str
    mlp: Mapping[str, str]  # projection -> output tensor name template ({layer})
    moe_keys: tuple[str, ...] = ()  # dropped even where config_class knows them
    overrides: Callable[[transformers.PretrainedConfig], dict[str, Any]] = _no_overrides
    zero_tensors: Mapping[str, Shape] = field(default_factory=dict)  # all-zero tensors per converted layer
    # the dense MLP is stored as the one expert of this fused layout (its biases too), not under `mlp`'s names
    fused: FusedLayout | None = None
    width_key: str = "intermediate_size"  # the target config's key for the dense MLP width


# Keys of a source config that never belong in an output config.
NEVER_COPIED = ("model_type", "architectures", "transformers_version", "auto_map", "quantization_config")


def target_values(config: transformers.PretrainedConfig, config_class: type, drop: Collection[str] = ()) -> dict:
    """The source config's values that `config_class` knows (its defaults, its
    constructor's parameters and its attribute_map), minus `drop`: remote-code
    pointers (`auto_map`) and keys of other architectures never reach an output config."""
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    known |= set(inspect.signature(config_class.__init__).parameters) - {"self", "args", "kwargs"}
    return {k: v for k, v in copied_values(config).items() if k in known and k not in drop}


def copied_values(config: transformers.PretrainedConfig) -> dict:
    """The source config's values, less those that never belong in an output config
    (for an output of the source's own class: a rebuilt smaller MoE)."""
    return {k: v for k, v in config.to_dict().items() if k not in NEVER_COPIED}


def template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{layer\}|\{expert\})", template)
    pattern = "".join(
        {"{layer}": r"(?P<layer>\d+)", "{expert}": r"(?P<expert>\d+)"}.get(part, re.escape(part)) for part in parts
    )
    return re.compile(pattern)
