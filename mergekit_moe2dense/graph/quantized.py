# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The write graph's quantized outputs. With `output_quantization: source`, a tensor the source stores
quantized (block-wise FP8, MXFP4) is written in the same format, as its data and scales; with
`output_quantization: fp8`, an output's linear weights (and experts) are quantized as they are written
(`quantized_weights`; which ones: outputs/fp8.py).

What is not modified is copied as stored, bit for bit (`CopyStored`: the non-expert tensors, a kept
expert's weight and scales, a kept GPT-OSS expert's blocks and scales); what is new (a merged
expert, a re-fitted projection) is quantized in the source's format (`Quantize`, io/quantize.py).
`source_formats` says which source tensors are written so, and each builder below returns the
(name, task) pairs of one output tensor, or the plain one where it is not quantized.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Task

from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.graph.resources import graph_resources
from mergekit_moe2dense.io.headers import ShardHeaders
from mergekit_moe2dense.io.quantize import QuantizedFormat, quantized_names

__all__ = [
    "CopyStored",
    "Quantize",
    "QuantizedBytes",
    "QuantizedPart",
    "StackExperts",
    "copied_tensor",
    "quantized_expert",
    "quantized_stack",
    "quantized_weights",
    "source_formats",
]

Outputs = list[tuple[str, Task]]


class QuantizedBytes(Task[torch.Tensor]):
    """A quantized tensor's data or scales: written in its own dtype, never cast to `out_dtype`."""


class CopyStored(QuantizedBytes):
    """A contiguous piece of a stored tensor (a quantized tensor's data or scales, one expert's, or
    a row range of it) as stored: no dequantization, the same bytes."""

    model: ModelReference
    piece: ExpertSlice

    def arguments(self) -> dict[str, Task]:
        return {}

    def priority(self) -> int:
        return -1000  # as ReadTensor: read as late as possible, freed soon after

    def group_label(self) -> str | None:
        return graph_resources.reader(self.model).file_position(self.piece.tensor)

    def execute(self) -> torch.Tensor:
        return graph_resources.reader(self.model).read_stored(self.piece)


class Quantize(Task[tuple]):
    """A computed tensor quantized: (data, scales) in `form`, from the tensor cast to `dtype` first
    where one is given (the output dtype a dequantized output writes it in)."""

    tensor: Task
    form: QuantizedFormat
    dtype: str | None = None

    def arguments(self) -> dict[str, Task]:
        return {"tensor": self.tensor}

    def group_label(self) -> str | None:
        return self.tensor.group_label()  # where its input is read: the graph keeps the file's order

    def execute(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype is not None:
            tensor = tensor.to(dtype_from_name(self.dtype))
        return self.form.quantize(tensor)


class QuantizedPart(QuantizedBytes):
    """The data (0) or the scales (1) of a `Quantize`."""

    quantized: Quantize
    part: int

    def arguments(self) -> dict[str, Task]:
        return {"quantized": self.quantized}

    def group_label(self) -> str | None:
        return self.quantized.group_label()

    def execute(self, quantized: tuple) -> torch.Tensor:
        return quantized[self.part]


class StackExperts(QuantizedBytes):
    """One quantized tensor of a fused layout ([N, ...]) stacked from its N experts' data or scales,
    each [1, ...]."""

    parts: tuple[Task, ...]

    def arguments(self) -> dict[str, Task]:
        return {f"part_{i}": task for i, task in enumerate(self.parts)}

    def group_label(self) -> str | None:
        return self.parts[0].group_label()

    def execute(self, **parts) -> torch.Tensor:
        return torch.cat([parts[f"part_{i}"] for i in range(len(self.parts))])


def source_formats(source) -> dict[str, QuantizedFormat]:
    """The format of every quantized tensor of `source` (an `io.source.SourceModel`), by logical name:
    its kind, FP8 block and scale dtype (as the shard stores it), `scale_fmt: ue8m0`."""
    index = source.index
    quantized = getattr(index, "quantized", {})
    if not quantized:
        return {}
    headers = ShardHeaders(index)
    ue8m0 = (getattr(index, "quantization_config", None) or {}).get("scale_fmt") == "ue8m0"
    return {
        name: QuantizedFormat(q.kind, q.block, str(headers.entry(q.scales)[2]).removeprefix("torch."), ue8m0)
        for name, q in quantized.items()
    }


def copied_tensor(source, name: str, output: str, formats: Mapping[str, QuantizedFormat], read) -> Outputs:
    """Source tensor `name` written unchanged as `output`: its stored data and scales where it is
    written quantized, else `read(name)` (the tensor dequantized, as every output read it before)."""
    if name not in formats:
        return [(output, read(name))]
    quantized = source.index.quantized[name]
    data, scales = quantized_names(quantized.kind, output)
    return [
        (data, CopyStored(model=source.reference, piece=ExpertSlice(quantized.data))),
        (scales, CopyStored(model=source.reference, piece=ExpertSlice(quantized.scales))),
    ]


def quantized_expert(source, output: str, task: Task, origin: ExpertSlice, kept: bool, formats) -> Outputs:
    """One expert's projection written as its own tensor `output`, computed by `task`; `origin` is
    the source slice it comes from (any expert's, for a merge), `kept` whether it is that slice
    unchanged. Quantized where `origin`'s tensor is: a kept FP8 slice whose rows start and end on
    block boundaries is copied with its scales; anything else is quantized."""
    form = formats.get(origin.tensor)
    if form is None:
        return [(output, task)]
    data, scales = quantized_names(form.kind, output)
    stored = _stored_pieces(source, form, origin) if kept else None
    if stored is not None:
        return [
            (data, CopyStored(model=source.reference, piece=stored[0])),
            (scales, CopyStored(model=source.reference, piece=stored[1])),
        ]
    quantized = Quantize(tensor=task, form=form)
    return [(data, QuantizedPart(quantized=quantized, part=0)), (scales, QuantizedPart(quantized=quantized, part=1))]


def _stored_pieces(source, form: QuantizedFormat, origin: ExpertSlice) -> tuple[ExpertSlice, ExpertSlice] | None:
    """The stored data and scales of FP8 slice `origin`, where they are whole blocks of it."""
    if form.kind != "fp8" or not origin.contiguous or origin.units is not None:
        return None
    quantized = source.index.quantized[origin.tensor]
    rows = form.scale_rows(origin.rows, source.reader.shape(ExpertSlice(origin.tensor))[-2])  # cached headers
    if rows is False:
        return None
    return (
        ExpertSlice(quantized.data, origin.expert, origin.rows),
        ExpertSlice(quantized.scales, origin.expert, rows),
    )


def quantized_stack(source, output: str, experts: Sequence[tuple[Task, int | None]], origin: str, formats) -> Outputs:
    """A fused tensor `output` of N experts, in the format of source tensor `origin` (one of
    `formats`). `experts` holds, per new expert, the task computing its [1, ...] slice of the layout
    and the source expert it is unchanged (whole), or None: a kept expert's data and scales are the
    source expert's bytes; the others are quantized."""
    form = formats[origin]
    quantized = source.index.quantized[origin]
    data, scales = [], []
    for task, kept in experts:
        if kept is not None:  # rows kept..kept+1 of dim 0: [1, ...]
            data.append(CopyStored(model=source.reference, piece=ExpertSlice(quantized.data, rows=(kept, kept + 1))))
            scales.append(
                CopyStored(model=source.reference, piece=ExpertSlice(quantized.scales, rows=(kept, kept + 1)))
            )
        else:
            computed = Quantize(tensor=task, form=form)
            data.append(QuantizedPart(quantized=computed, part=0))
            scales.append(QuantizedPart(quantized=computed, part=1))
    names = quantized_names(form.kind, output)
    return [(names[0], StackExperts(parts=tuple(data))), (names[1], StackExperts(parts=tuple(scales)))]


def quantized_weights(outputs: Outputs, names: Collection[str], form: QuantizedFormat, dtype: str | None) -> Outputs:
    """`outputs` with each tensor of `names` written in `form`: its finished value, cast to `dtype`,
    quantized into data and scales; the others as they are. Each of `names` must be among `outputs`."""
    missing = set(names) - {name for name, _ in outputs}
    if missing:
        raise ValueError(f"output_quantization: fp8: the output has no tensor {min(missing)} to quantize")
    result = []
    for name, task in outputs:
        if name not in names:
            result.append((name, task))
            continue
        quantized = Quantize(tensor=task, form=form, dtype=dtype)
        data, scales = quantized_names(form.kind, name)
        result += [
            (data, QuantizedPart(quantized=quantized, part=0)),
            (scales, QuantizedPart(quantized=quantized, part=1)),
        ]
    return result
