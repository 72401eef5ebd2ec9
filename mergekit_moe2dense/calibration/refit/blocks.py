# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The modules the layer-sequential re-fit works on: `SparseBlock`, layer l's sparse block inside
its MoE layer (run it, record its inputs and outputs, free its weights), and `DenseMLP`, the dense
MLP that replaces it (`down(act(gate x) * up x)`, or the family's own hidden computation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergekit_moe2dense.calibration.layerwise import LayerStream
from mergekit_moe2dense.memory import release_freed_memory
from mergekit_moe2dense.refit import BIASES, Hidden, gated_hidden

__all__ = ["DenseMLP", "SparseBlock"]


class _Nothing(torch.nn.Module):
    """Stands in for shared experts that sit beside the sparse block (the dense MLP has them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class DenseMLP(torch.nn.Module):
    """down(act(gate x) * up x): the dense MLP that replaces a sparse block. With `biases`
    (gate_bias, up_bias [I], down_bias [H]) they are added to each projection's output;
    `hidden` (a family's own h, `refit.Hidden`) replaces act(gate x + b) * (up x + b)."""

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        act,
        biases: dict[str, torch.Tensor] | None = None,
        hidden: Hidden | None = None,
    ):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.biases = dict(biases or {})
        self.hidden = hidden or gated_hidden(act)

    @property
    def projections(self) -> dict[str, torch.Tensor]:
        return {"gate": self.gate, "up": self.up, "down": self.down, **self.biases}

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x, self.projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.intermediate(x.float()) @ self.down.T
        if "down_bias" in self.biases:
            out = out + self.biases["down_bias"]
        return out.to(x.dtype)


@dataclass
class SparseBlock:
    """Layer l's sparse block as the per-layer step sees it: loaded, inside its MoE
    layer, whose carried inputs are the outputs of the converted layers 0..l-1."""

    stream: LayerStream
    index: int  # decoder layer
    layer: torch.nn.Module  # the MoE decoder layer
    path: str  # the block's module path in stream.model
    module: torch.nn.Module
    router: torch.nn.Module
    act: Callable[[torch.Tensor], torch.Tensor] | None  # the experts' activation (None: GPT-OSS's own)
    # shared experts beside the block (Granite's `shared_mlp`), on the same input: part of the target
    shared_path: str | None = None
    keep: torch.Tensor | None = None  # during `run`: the current batch's non-padding tokens [B*T], on the device
    # the family's own h of a dense MLP (GPT-OSS's clamped SwiGLU with biases); None: act(G x) * (U x)
    hidden: Hidden | None = None

    @classmethod
    def of(cls, stream: LayerStream, index: int, layer: torch.nn.Module) -> SparseBlock:
        family = stream.family
        path = family.router_module(index).rsplit(".", 1)[0]
        experts = stream.model.get_submodule(family.experts_module(index))
        return cls(
            stream,
            index,
            layer,
            path,
            stream.model.get_submodule(path),
            stream.model.get_submodule(family.router_module(index)),
            getattr(experts, "act_fn", None),  # GPT-OSS: none (its `dense_hidden`)
            family.shared_module(stream.source.config, index),
            hidden=family.dense_hidden(experts, index),
        )

    def dense(self, projections: dict[str, torch.Tensor]) -> DenseMLP:
        """The dense MLP of these projections (and biases), computing what the family's experts do."""
        biases = {b: projections[b] for b in BIASES if b in projections}
        return DenseMLP(projections["gate"], projections["up"], projections["down"], self.act, biases, self.hidden)

    def swaps(self, dense: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """What replaces the block (and shared experts beside it) in the dense layer."""
        dense = self.stream.family.dense_block(dense)
        return {self.path: dense, **({self.shared_path: _Nothing()} if self.shared_path else {})}

    def run(self, *handles) -> None:
        """One pass of every batch through the MoE layer (the carried states stay);
        `keep` is set for each batch before its forward; `handles` (hooks) are removed after."""

        def before(b: int) -> None:
            self.keep = self.stream.batches[b].attention_mask.reshape(-1).bool().to(self.stream.device)

        try:
            self.stream.forward(self.layer, advance=False, before_batch=before)
        finally:
            for handle in handles:
                handle.remove()

    def record(self, on_tokens: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """One pass: `on_tokens(x, y)` per batch with the block's input x and output y
        [N, H] of the non-padding tokens, in float32."""

        pending = []

        def hook(_module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[self.keep].float()
            output = output[0] if isinstance(output, tuple) else output  # Llama 4's block adds its router logits
            y = output.reshape(-1, output.shape[-1])[self.keep].float()
            if self.shared_path is None:
                on_tokens(x, y)
            else:  # completed by the shared experts' output, which comes next
                pending.append((x, y))

        def shared_hook(_module, _inputs, output):
            x, y = pending.pop()
            on_tokens(x, y + output.reshape(-1, output.shape[-1])[self.keep].float())

        handles = [self.module.register_forward_hook(hook)]
        if self.shared_path is not None:
            handles.append(self.stream.model.get_submodule(self.shared_path).register_forward_hook(shared_hook))
        self.run(*handles)

    def nbytes(self, *, shared: bool) -> int:
        """The bytes `release(shared=shared)` frees: the block's weights (and the shared experts')."""
        modules = [self.module]
        if shared and self.shared_path is not None:
            modules.append(self.stream.model.get_submodule(self.shared_path))
        return sum(t.nbytes for m in modules for t in [*m.parameters(), *m.buffers()] if not t.is_meta)

    def release(self, *, shared: bool) -> None:
        """Free the sparse block's weights (and with `shared` the shared experts beside it) once
        its outputs are recorded: the advancing forward runs the module that replaces it, and
        `LayerStream.load_layer` materialises the whole layer again. The solve that follows then
        does not hold a layer of experts beside its Gram matrices (the re-fit phase's peak)."""
        self.module.to_empty(device="meta")
        if shared and self.shared_path is not None:
            self.stream.model.get_submodule(self.shared_path).to_empty(device="meta")
        release_freed_memory()

    def load(self, piece) -> torch.Tensor:
        """One expert's projection from the checkpoint, on the device."""
        return self.stream.read_slice(piece).to(self.stream.device)
