# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-streaming engine: run calibration batches through a checkpoint one
decoder layer at a time, never instantiating the whole model.

The sequential pattern of GPTQ and llm-compressor's sequential pipeline:

1. Build the model skeleton from its config on the meta device (transformers'
   own classes, so attention, masks and rotary embeddings are the family's).
2. Materialise only the token embeddings and the rotary embedding, and run the
   base model's own forward over each batch with decoder layer 0 replaced by a
   catcher that stores its inputs (hidden states and the keyword arguments the
   model passes: causal mask, position ids, position embeddings) and stops.
3. For each decoder layer in turn: materialise it in place from the checkpoint
   (each tensor, or one expert's rows of either checkpoint layout, read by
   `checkpoint.TensorReader` straight into the fused in-memory `gate_up_proj`
   [E, 2I, H] (gate rows first) / `down_proj` [E, H, I] through the family's
   `resolve_layer` slices), run every batch through it,
   replace the carried hidden states by its outputs, and free it.

Peak memory is one layer's weights plus the carried activations, which stay on
the device or are spilled to disk (`spill_dir`). Because the streamed layer is
the very module object of the skeleton, forward hooks registered on the
skeleton (e.g. `RouterRecorder`) fire on it unchanged.

One loop over the decoder layers, several users (router statistics, the
re-fit, `inspect`'s short calibration): `LayerStream.run(visitor)` calls a
`LayerVisitor`'s callbacks in this order, for each decoder layer l::

    layer = stream.load_layer(l)                     # materialised from the checkpoint
    swaps = visitor.prepare_layer(stream, l, layer)  # may run stream.forward(layer, advance=False)
    with the modules of `swaps` in place of theirs:  # e.g. a dense MLP for the sparse block
        for each batch b:
            visitor.before_batch(b)
            carried states of b <- layer(carried states of b)
    stream.free_layer(l)                             # the swapped-out modules are back first
    visitor.after_layer(stream, l)                   # stream.inputs(b): layer l's outputs

So in `prepare_layer` the carried states are layer l's inputs: the outputs of
layers 0..l-1 *as converted* by earlier swaps. Forward hooks registered on the
skeleton (e.g. `RouterRecorder`) fire on the streamed layer unchanged, since it
is the very module object of the skeleton. `stream.forward(module, advance=False)`
runs the batches without replacing the carried states (to look at a layer
without committing to its output; `before_batch` is not called for it), and
`stream.inputs(b)` / `stream.kwargs(b)` give a batch's carried states and layer
arguments.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import torch
import tqdm
import transformers

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.checkpoint import READAHEAD_BYTES, TensorReader
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.memory import release_freed_memory

__all__ = ["LayerStream", "LayerStreamError", "LayerVisitor"]


class LayerStreamError(Moe2DenseError, ValueError):
    """The checkpoint lacks a tensor the streamed layer needs."""


class LayerVisitor:
    """Per-layer callbacks of `LayerStream.run` (see the module docstring for their order).

    Every callback is optional: the defaults do nothing and swap nothing.
    """

    def prepare_layer(self, stream: LayerStream, index: int, layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Decoder layer `index` is loaded and the carried states are its inputs. Extra
        passes may run here (`stream.forward(layer, advance=False)`); the returned
        {module path in `stream.model`: module} replace those submodules during the
        advancing forward only, so the carried states come from the swapped layer."""
        return {}

    def before_batch(self, batch: int) -> None:
        """Before batch `batch` of the advancing forward through each layer."""

    def after_layer(self, stream: LayerStream, index: int) -> None:
        """Layer `index` has run and is freed; the carried states are its outputs."""


class _Caught(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer 0: records what the model passes it, then stops."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        # Sliding-window families pick the mask by the layer's attention type.
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self.caught = None

    def forward(self, hidden_states, **kwargs):
        self.caught = (hidden_states, kwargs)
        raise _Caught


class LayerStream:
    """Carries calibration activations through a checkpoint, one decoder layer at a time.

    `source` is a `checkpoint.SourceModel`; `batches` the padded token batches
    (the same `TokenBatch`es the full forward takes, so masks and position ids
    are identical). `spill_dir` keeps the carried hidden states on disk instead
    of on the device (a temporary directory under it, removed on exit).
    """

    def __init__(
        self,
        source,
        batches: list[TokenBatch],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        spill_dir: str | None = None,
    ):
        self.source = source
        self.batches = batches
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = source.family
        self._spill_root = spill_dir
        self._spill: str | None = None
        self._hidden: list[torch.Tensor | None] = [None] * len(batches)
        self._kwargs: list[dict] = []
        # reads the next layer's bytes while this one computes
        self._reader = TensorReader(source.index, readahead=READAHEAD_BYTES)
        self._moe_layers: dict[int, MoELayer] = {layer.index: layer for layer in source.moe_layers()}
        config = source.config
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.base = self.model.get_decoder()
        self.layers = self.base.layers
        modules = {id(module): name for name, module in self.model.named_modules()}
        self._layers_path = modules[id(self.layers)]

    @property
    def layer_indices(self) -> range:
        return range(len(self.layers))

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> LayerStream:
        if self._spill_root is not None:
            os.makedirs(self._spill_root, exist_ok=True)
            self._spill = tempfile.mkdtemp(prefix="moe2dense-acts-", dir=self._spill_root)
        self._embed()
        return self

    def __exit__(self, *exc) -> None:
        self._reader.close()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
        self._hidden = [None] * len(self.batches)
        self._kwargs = []

    # -- carried activations ---------------------------------------------------------
    def inputs(self, batch: int) -> torch.Tensor:
        """Hidden states entering the current layer for one batch [B, T, H], on the device."""
        if self._spill is None:
            return self._hidden[batch]
        return torch.load(self._spill_path(batch), map_location=self.device)

    def kwargs(self, batch: int) -> dict:
        """Keyword arguments the model passes its decoder layers for one batch."""
        return self._kwargs[batch]

    def set_inputs(self, batch: int, hidden: torch.Tensor) -> None:
        if self._spill is None:
            self._hidden[batch] = hidden
        else:
            torch.save(hidden.cpu(), self._spill_path(batch))

    def _spill_path(self, batch: int) -> str:
        return os.path.join(self._spill, f"batch{batch:06d}.pt")

    def _embed(self) -> None:
        """Layer-0 inputs of every batch, from the model's own forward up to layer 0."""
        embed = self.base.get_input_embeddings()
        self._materialise(embed, self._module_name(embed))
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is not None:  # buffers computed from the config, not stored
            with torch.device(self.device):
                self.base.rotary_emb = type(rotary)(config=self.model.config)
        first = self.layers[0]
        catcher = _Catcher(first)
        self.layers[0] = catcher
        try:
            with torch.inference_mode():
                for b, batch in enumerate(self.batches):
                    try:
                        self.base(
                            input_ids=batch.input_ids.to(self.device),
                            attention_mask=batch.attention_mask.to(self.device),
                            use_cache=False,
                        )
                    except _Caught:
                        pass
                    hidden, kwargs = catcher.caught
                    self._kwargs.append(kwargs)
                    self.set_inputs(b, hidden)
        finally:
            self.layers[0] = first
            embed.to_empty(device="meta")

    # -- layers --------------------------------------------------------------------
    def load_layer(self, index: int) -> torch.nn.Module:
        """Materialise decoder layer `index` in place from the checkpoint."""
        layer = self.layers[index]
        self._materialise(layer, f"{self._layers_path}.{index}", self._moe_layers.get(index))
        return layer

    def free_layer(self, index: int) -> None:
        self.layers[index].to_empty(device="meta")
        release_freed_memory()

    def run(self, visitor: LayerVisitor, *, desc: str = "Calibrating", progress: bool = True) -> None:
        """The layer loop: every decoder layer in turn is loaded, shown to `visitor`, run
        on every batch (the carried states advance, through the visitor's swaps), freed."""
        for index in tqdm.tqdm(self.layer_indices, desc=desc, unit="layer", disable=not progress):
            layer = self.load_layer(index)
            swaps = visitor.prepare_layer(self, index, layer) or {}
            originals = {path: self.model.get_submodule(path) for path in swaps}
            try:
                for path, module in swaps.items():
                    self.model.set_submodule(path, module)
                self.forward(layer, before_batch=visitor.before_batch)
            finally:  # the skeleton keeps its own modules, to be freed and reloaded
                for path, module in originals.items():
                    self.model.set_submodule(path, module)
            self.free_layer(index)
            visitor.after_layer(self, index)

    def forward(
        self,
        module: torch.nn.Module,
        *,
        advance: bool = True,
        before_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Run every batch through `module` (a decoder layer); with `advance`, its
        outputs become the carried hidden states."""
        with torch.inference_mode():
            for b in range(len(self.batches)):
                if before_batch is not None:
                    before_batch(b)
                out = module(self.inputs(b), **self.kwargs(b))
                if isinstance(out, tuple):  # older layer classes return (hidden, ...)
                    out = out[0]
                if advance:
                    self.set_inputs(b, out)

    # -- loading -------------------------------------------------------------------
    def read_slice(self, piece: ExpertSlice) -> torch.Tensor:
        """One expert's projection from the checkpoint, reading only its bytes."""
        return self._reader.read_slice(piece)

    def _module_name(self, module: torch.nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise RuntimeError("module is not part of the model")

    def _materialise(self, module: torch.nn.Module, prefix: str, moe: MoELayer | None = None) -> None:
        """Fill `module`'s parameters in place, one checkpoint tensor at a time, so the
        peak is the layer itself plus one tensor (no second copy of the layer)."""
        module.to_empty(device=self.device)
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        fill_experts = self._expert_fillers(moe) if moe is not None else {}
        with torch.no_grad():
            for name, target in targets.items():
                full = f"{prefix}.{name}" if prefix else name
                if full in fill_experts:
                    fill_experts[full](target)
                elif full in self.source.index.tensor_paths:
                    self._reader.read(full, out=target)
                else:
                    raise LayerStreamError(f"cannot stream {full}: the checkpoint has no such tensor")

    def _expert_fillers(self, moe: MoELayer) -> dict[str, Callable[[torch.Tensor], None]]:
        """Writers of the sparse block's fused in-memory tensors (`gate_up_proj` [E, 2I, H],
        gate rows first; `down_proj` [E, H, I]) from either checkpoint layout, expert by expert."""
        read = self._reader.read_slice

        def gate_up(target: torch.Tensor) -> None:
            rows = target.shape[1] // 2
            for e, expert in enumerate(moe.experts):
                read(expert["gate"], out=target[e, :rows])
                read(expert["up"], out=target[e, rows:])

        def down(target: torch.Tensor) -> None:
            for e, expert in enumerate(moe.experts):
                read(expert["down"], out=target[e])

        experts = self.family.experts_module(moe.index)
        return {
            f"{self.family.router_module(moe.index)}.weight": lambda t: self._reader.read(moe.router, out=t),
            f"{experts}.gate_up_proj": gate_up,
            f"{experts}.down_proj": down,
        }
