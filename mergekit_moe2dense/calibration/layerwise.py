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
   `io.reader.TensorReader` straight into the fused in-memory `gate_up_proj`
   [E, 2I, H] (gate rows first) / `down_proj` [E, H, I] through the family's
   `resolve_layer` slices), run every batch through it,
   replace the carried hidden states by its outputs, and free it.

Peak memory is one layer's weights plus the carried activations, which stay on
the device or are spilled to disk (`spill_dir`). The streamed layer is held and
computed in `compute_dtype`, the carried activations in `dtype` (the calibration
dtype): by default (`layer_compute_dtype`) a bfloat16/float16 calibration on a
CPU without native 16-bit matmuls computes each layer in float32 (the reader casts
on read), which such CPUs run several times faster, and closer to a float32
forward; the activations between layers stay in 16 bits, so their memory is
unchanged. Because the streamed layer is
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
`stream.inputs(b)` / `stream.kwargs(b, l)` give a batch's carried states and layer
l's arguments (per layer: families that mix full and sliding-window attention pass
each layer the mask of its own type).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from collections.abc import Callable

import torch
import tqdm
import transformers

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import ExpertSlice, MoELayer
from mergekit_moe2dense.io.reader import READAHEAD_BYTES, TensorReader
from mergekit_moe2dense.memory import is_exclusively_held, release_freed_memory
from mergekit_moe2dense.output_dir import make_working_directory, remove_working_directory

__all__ = ["LayerStream", "LayerStreamError", "LayerVisitor", "layer_compute_dtype", "native_16bit_matmul"]

LOG = logging.getLogger(__name__)


def layer_compute_dtype(
    dtype: torch.dtype, device: str, requested: torch.dtype | None = None, *, native: bool | None = None
) -> torch.dtype:
    """The dtype a streamed layer is held and computed in: `requested` if given, else float32
    for a bfloat16/float16 calibration on a CPU without native matmuls in that dtype (`native`,
    by default `native_16bit_matmul`: there torch's fallback kernels are several times slower
    than float32, and one layer's float32 copy is small), else `dtype` itself."""
    if requested is not None:
        return requested
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        if not (native_16bit_matmul(dtype) if native is None else native):
            return torch.float32
    return dtype


def native_16bit_matmul(dtype: torch.dtype) -> bool:
    """Whether torch multiplies `dtype` matrices on this CPU with oneDNN's 16-bit kernels (AVX-512
    BF16/FP16, AMX, or their AVX-512 emulation), as it does when oneDNN reports the dtype
    supported; without them it falls back to slow reference kernels."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return check is not None and bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


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
    """Stands in for a decoder layer: records what the model passes it, then passes its
    input on unchanged (or, for the last layer, stops). Families that alternate layer
    types (sliding / full attention, linear attention) pass each layer its own mask."""

    def __init__(self, layer: torch.nn.Module, last: bool):
        super().__init__()
        # Sliding-window families pick the mask by the layer's attention type.
        for name in ("attention_type", "layer_type"):
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self.last = last
        self.caught = None

    def forward(self, hidden_states, **kwargs):
        self.caught = (hidden_states, kwargs)
        if self.last:
            raise _Caught
        return hidden_states


class LayerStream:
    """Carries calibration activations through a checkpoint, one decoder layer at a time.

    `source` is a `io.source.SourceModel`; `batches` the padded token batches
    (the same `TokenBatch`es the full forward takes, so masks and position ids
    are identical). `spill_dir` keeps the carried hidden states on disk instead
    of on the device (in `moe2dense-acts-HOST-PID` under it, removed on exit, or by the next
    stream on this host if this process was killed: `output_dir.make_working_directory`). `dtype` is
    the carried activations' dtype; `compute_dtype` the streamed layer's weights and
    arithmetic (None: `layer_compute_dtype`'s default for `dtype` on `device`).
    """

    @classmethod
    def of(cls, source, batches: list[TokenBatch], stream: StreamSettings) -> LayerStream:
        """The stream of one pass of a run, on the run's `StreamSettings` (the pass shows its
        own progress: `run(..., progress=stream.progress)`)."""
        return cls(
            source,
            batches,
            device=stream.device,
            dtype=stream.dtype,
            compute_dtype=stream.compute_dtype,
            spill_dir=stream.spill_dir,
        )

    def __init__(
        self,
        source,
        batches: list[TokenBatch],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        spill_dir: str | None = None,
    ):
        self.source = source
        self.batches = batches
        self.device = torch.device(device)
        self.dtype = dtype
        self.compute_dtype = layer_compute_dtype(dtype, device, compute_dtype)
        self.family = source.family
        self._spill_root = spill_dir
        self._spill: str | None = None
        self._hidden: list[torch.Tensor | None] = [None] * len(batches)
        self._kwargs: list[list[dict]] = []  # [batch][layer]
        self._current = 0  # the decoder layer loaded last
        self._reusable: dict[tuple, list[torch.Tensor]] = {}  # the last freed layer's tensors, by (shape, dtype)
        # O_DIRECT reads (no copy out of the page cache); where the file system has none, plain
        # reads with a thread reading the next layer's bytes into the page cache meanwhile
        self._reader = TensorReader(source.index, readahead=READAHEAD_BYTES, direct=True)
        self._moe_layers: dict[int, MoELayer] = {layer.index: layer for layer in source.moe_layers()}
        config = source.config
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=self.compute_dtype)
        self.model.eval()
        self.base = self.model.get_decoder()
        if not hasattr(self.base, "layers"):  # Llama 4: its base_model_prefix names no module
            self.base = self.model.model
        self.layers = self.base.layers
        modules = {id(module): name for name, module in self.model.named_modules()}
        self._layers_path = modules[id(self.layers)]

    @property
    def layer_indices(self) -> range:
        return range(len(self.layers))

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> LayerStream:
        if self._spill_root is not None:
            self._spill = make_working_directory(self._spill_root, spill_prefix())
        LOG.info(
            "layer stream on %s: layers computed in %s, activations carried in %s",
            self.device,
            _name(self.compute_dtype),
            _name(self.dtype),
        )
        try:
            self._embed()
        except BaseException:
            self.__exit__()  # `with` calls no __exit__ when __enter__ fails: the spill directory too
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._reusable.clear()  # the last freed layer's memory
        self._reader.close()
        if self._spill is not None:
            remove_working_directory(self._spill)
        self._hidden = [None] * len(self.batches)
        self._kwargs = []

    # -- carried activations ---------------------------------------------------------
    def inputs(self, batch: int) -> torch.Tensor:
        """Hidden states entering the current layer for one batch [B, T, H], on the device, in
        the compute dtype (carried in `dtype`)."""
        if self._spill is None:
            hidden = self._hidden[batch]
        else:
            hidden = torch.load(self._spill_path(batch), map_location=self.device)
        return hidden.to(self.compute_dtype)

    def kwargs(self, batch: int, layer: int | None = None) -> dict:
        """Keyword arguments the model passes decoder layer `layer` (default: the one loaded
        last) for one batch (masks differ per layer where layer types alternate)."""
        return self._kwargs[batch][self._current if layer is None else layer]

    def set_inputs(self, batch: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to(self.dtype)
        if self._spill is None:
            self._hidden[batch] = hidden
        else:
            torch.save(hidden.cpu(), self._spill_path(batch))

    def _spill_path(self, batch: int) -> str:
        return os.path.join(self._spill, f"batch{batch:06d}.pt")

    def _embed(self) -> None:
        """Layer-0 inputs of every batch, from the model's own forward up to layer 0, and
        every layer's arguments (the forward runs on through stand-ins that change nothing)."""
        embed = self.base.get_input_embeddings()
        self._materialise(embed, self._module_name(embed))
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is not None:  # buffers computed from the config, not stored
            with torch.device(self.device):
                self.base.rotary_emb = type(rotary)(config=self.model.config)
        layers = list(self.layers)
        catchers = [_Catcher(layer, last=i == len(layers) - 1) for i, layer in enumerate(layers)]
        for i, catcher in enumerate(catchers):
            self.layers[i] = catcher
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
                    self._kwargs.append([catcher.caught[1] for catcher in catchers])
                    self.set_inputs(b, catchers[0].caught[0])
        finally:
            for i, layer in enumerate(layers):
                self.layers[i] = layer
            embed.to_empty(device="meta")

    # -- layers --------------------------------------------------------------------
    def load_layer(self, index: int) -> torch.nn.Module:
        """Materialise decoder layer `index` in place from the checkpoint."""
        layer = self.layers[index]
        self._current = index
        try:
            self._materialise(layer, f"{self._layers_path}.{index}", self._moe_layers.get(index))
        finally:
            self._reusable.clear()  # what this layer did not take: freed, at most one layer is held
        return layer

    def free_layer(self, index: int) -> None:
        """Back to the meta device; the layer's tensors that nothing else holds are kept for the
        next layer's parameters of the same shape (`_reusable`). Fresh memory for every layer cost
        a page fault per 4 KB while the checkpoint was read into it (the reads ran at 1.3 instead
        of 12 GB/s out of the page cache), a third of a streamed calibration's time."""
        layer = self.layers[index]
        self._reusable.clear()
        for module in layer.modules():
            for store in (module._parameters, module._buffers):
                for tensor in store.values():
                    # held by `store` and `tensor` alone: what a visitor or a hook kept (a parameter,
                    # a view of it) is left alone, never overwritten by the next layer
                    if tensor is not None and tensor.device.type != "meta" and is_exclusively_held(tensor, holders=2):
                        self._reusable.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor.detach())
        layer.to_empty(device="meta")
        release_freed_memory()

    def _empty_like(self, template: torch.Tensor) -> torch.Tensor:
        """Storage for a meta parameter or buffer: a freed layer's of its shape and dtype, else new."""
        reusable = self._reusable.get((tuple(template.shape), template.dtype))
        return reusable.pop() if reusable else torch.empty_like(template, device=self.device)

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
                del swaps, originals  # e.g. the re-fit's dense MLP: not held while the next layer loads
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
        index = next(i for i, layer in enumerate(self.layers) if layer is module)
        with torch.inference_mode():
            for b in range(len(self.batches)):
                if before_batch is not None:
                    before_batch(b)
                out = module(self.inputs(b), **self.kwargs(b, index))
                if isinstance(out, tuple):  # older layer classes return (hidden, ...)
                    out = out[0]
                if advance:
                    self.set_inputs(b, out)

    def load_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm and the LM head, materialised from the checkpoint: hidden states after
        the last layer -> logits. A tied head without its own tensor reads the embeddings."""
        norm, head = self.base.norm, self.model.get_output_embeddings()
        self._materialise(norm, self._module_name(norm))
        head_name = self._module_name(head)
        head.to_empty(device=self.device)
        stored = f"{head_name}.weight"
        if stored not in self.source.index.tensor_paths and self.model.config.tie_word_embeddings:
            stored = f"{self._module_name(self.base.get_input_embeddings())}.weight"
        if stored not in self.source.index.tensor_paths:
            raise LayerStreamError(f"cannot stream {head_name}.weight: the checkpoint has no such tensor")
        with torch.no_grad():
            self._reader.read(stored, out=head.weight)

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return head(norm(hidden))

        return logits

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
        module._apply(self._empty_like)  # as to_empty(device), on the freed layer's memory where it fits
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
        """Writers of the sparse block's fused in-memory tensors (the family's
        `memory_layout`: `gate_up_proj` [E, 2I, H], gate rows first, and `down_proj`
        [E, H, I] for most; transposed and interleaved for GPT-OSS; expert biases) from
        either checkpoint layout, expert by expert: each stored slice is read into its view
        of the in-memory tensor."""
        experts = self.family.experts_module(moe.index)
        memory = self.family.memory_layout().slices(
            moe.index, moe.num_experts, self.family.expert_width(self.source.config)
        )
        fillers: dict[str, list[tuple[ExpertSlice, ExpertSlice]]] = {}
        for stored, held in zip(moe.experts, memory):
            for projection, piece in stored.items():
                if piece == held[projection]:
                    continue  # stored as held in memory: read whole, by name
                name = f"{experts}.{held[projection].tensor.rsplit('.', 1)[-1]}"
                fillers.setdefault(name, []).append((piece, held[projection]))

        def filler(pairs: list[tuple[ExpertSlice, ExpertSlice]]) -> Callable[[torch.Tensor], None]:
            def fill(target: torch.Tensor) -> None:
                for piece, held in pairs:
                    self._reader.read_slice(piece, out=held.take(target))

            return fill

        result = {name: filler(pairs) for name, pairs in fillers.items()}
        result[f"{self.family.router_module(moe.index)}.weight"] = lambda t: self._reader.read(moe.router, out=t)
        # extra tensors this layout stores under other names (a router bias)
        for memory_name, name in moe.renamed.items():
            result[memory_name] = functools.partial(lambda stored, t: self._reader.read(stored, out=t), name)
        return result


def spill_prefix() -> str:
    """The spill directory's name before the PID. The host is part of it because a PID says
    nothing about processes on other hosts: the ranks of a multi-node run may share `spill_dir`."""
    return f"moe2dense-acts-{re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname())}-"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
