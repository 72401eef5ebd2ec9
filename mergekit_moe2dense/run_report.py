# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What a conversion tells its user: before it (`--dry-run`: what would be done, how large the
output is, and an estimate of the time and peak memory on this machine from a short measured
probe) and after it (the end-of-run summary: what was written, how large, the re-fit's errors,
the time, and the `eval` command that compares the output with the MoE).

The estimate reads and merges one MoE layer's experts and times one matrix product, then scales
by the layer count and the calibration tokens: it is an estimate, and says so.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mergekit_moe2dense.outputs.base import output_bytes
from mergekit_moe2dense.plan import ClusterPlan, MoEPlan, SmallerMoEPlan

__all__ = ["RunEstimate", "RunSummary", "estimate_run", "summarize_run"]

PROBE_TOKENS = 256  # rows of the matrix product timed for the calibration's throughput


@dataclass(frozen=True)
class RunEstimate:
    """What a run would do (`--dry-run`), nothing of it written."""

    method: str
    parameters: Mapping[str, object]
    calibration_tokens: int | None  # None: no calibration (or the statistics of --stats)
    output: str
    parameter_count: int | None
    size_bytes: int | None
    seconds: float  # an estimate, from the probe
    peak_bytes: int  # an estimate

    def format(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.parameters.items()) or "none"
        tokens = "none" if self.calibration_tokens is None else f"{self.calibration_tokens} tokens"
        return "\n".join(
            [
                "Dry run: nothing was written.",
                f"  method: {self.method} ({values})",
                f"  calibration: {tokens}",
                f"  output: {self.output}, {_count(self.parameter_count)} parameters, {_size(self.size_bytes)} on disk",
                f"  estimate for this machine: ~{_duration(self.seconds)}, peak memory "
                f"~{_size(self.peak_bytes)} (from a probe of one layer, scaled)",
            ]
        )


@dataclass(frozen=True)
class RunSummary:
    """What a finished run wrote and how long it took."""

    out_path: str
    output: str
    parameter_count: int | None
    size_bytes: int
    refit_errors: Mapping[int, tuple[float, float]]
    seconds: float
    eval_command: str
    ignored_verdict: str | None = None  # inspect's warning about the averaged experts

    def format(self) -> str:
        lines = [
            f"  output: {self.output}, {_count(self.parameter_count)} parameters, {_size(self.size_bytes)} on disk",
        ]
        for index, (before, after) in sorted(self.refit_errors.items()):
            lines.append(f"  re-fit, layer {index}: relative error {before:.4g} -> {after:.4g}")
        if self.ignored_verdict:
            lines.append(f"  the inspect verdict was ignored: {self.ignored_verdict}")
        lines.append(f"  time: {_duration(self.seconds)}")
        lines.append(f"  compare it with the MoE: {self.eval_command}")
        return "\n".join(lines)


# -- before the run ---------------------------------------------------------------------------
def estimate_run(job) -> RunEstimate:
    """The dry run of a prepared `job.ConversionJob`: its output and an estimate of its cost,
    from a probe of its first MoE layer; nothing is written and no calibration runs."""
    plan_type, params, source, layers = job.output.plan_type, job.params, job.source, job.layers
    tokens = _calibration_tokens(job)
    merge_seconds, expert_bytes, flops = _probe(source, layers[0])
    outputs = params.num_clusters if plan_type in (ClusterPlan, MoEPlan) else 1
    seconds = merge_seconds * len(layers) * outputs
    if tokens and not job.stats_path:
        active = _parameters(source, layers, source.family.top_k(source.config)) or 0
        passes = 2 if params.needs_refit else 1  # the statistics pass, then the re-fit's
        seconds += passes * 2 * tokens * active / flops
    resident = output_bytes(source, layers, None, source.family.num_experts(source.config)) or 0
    full = job.config.calibration is not None and job.config.calibration.engine != "layerwise"
    peak = 2 * expert_bytes + (resident if full and not job.stats_path else 0)
    return RunEstimate(
        method=job.config.merge_method,
        parameters=params.model_dump(mode="json"),
        calibration_tokens=tokens,
        output=output_description(job),
        parameter_count=_parameters(source, layers, _experts_per_layer(plan_type, params)),
        size_bytes=job.output.estimated_bytes(job),
        seconds=seconds,
        peak_bytes=peak,
    )


def output_description(job) -> str:
    """The output's architecture class, how many models it is, and a quantized output's format."""
    plan_type, params, family = job.output.plan_type, job.params, job.source.family
    if plan_type is ClusterPlan:
        described = f"{params.num_clusters} dense models ({family.dense.architecture})"
    elif plan_type is MoEPlan:
        described = f"an MoE with {params.num_clusters} experts per layer ({family.moe_architecture})"
    elif plan_type is SmallerMoEPlan:
        described = f"an MoE with {params.num_experts} experts per layer ({family.moe_architecture})"
    else:
        described = f"a dense model ({family.dense.architecture})"
    if job.quantization == "fp8":
        return f"{described} in block FP8 ({' x '.join(map(str, job.io.fp8_block))} blocks)"
    if job.quantization == "source":
        return f"{described} in the source's {job.source.index.quantization_config.get('quant_method')}"
    return described


def _experts_per_layer(plan_type, params) -> int:
    """Experts per MoE layer each output model holds (a dense model: one MLP)."""
    if plan_type is MoEPlan:
        return params.num_clusters
    if plan_type is SmallerMoEPlan:
        return params.num_experts
    return 1


def _parameters(source, layers, experts_per_layer: int) -> int | None:
    """Parameters of a model with `experts_per_layer` experts per MoE layer (float32: 4 bytes each)."""
    size = output_bytes(source, layers, "float32", experts_per_layer)
    return None if size is None else size // 4


def _calibration_tokens(job) -> int | None:
    if job.stats_path:
        return job.loaded_statistics.tokens
    calibration = job.config.calibration
    return None if calibration is None else calibration.num_samples * calibration.seq_len


def _probe(source, layer) -> tuple[float, int, float]:
    """Seconds to read and average one layer's experts, their bytes in float32, and the FLOP/s
    of a matrix product with one of them (at least 1)."""
    pieces = [expert[name] for expert in layer.experts for name in sorted(expert)]
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    expert_bytes = 0
    for index, tensor in enumerate(source.reader.read_many(pieces, dtype=torch.float32)):
        name = sorted(layer.experts[0])[index % len(layer.experts[0])]
        tensor = tensor.float()
        expert_bytes += tensor.numel() * 4
        sums[name] = tensor.clone() if name not in sums else sums[name].add_(tensor)
    merge_seconds = time.perf_counter() - started
    weight = next((t for t in sums.values() if t.dim() == 2), None)
    if weight is None:
        return merge_seconds, expert_bytes, 1e9
    inputs = torch.randn(PROBE_TOKENS, weight.shape[1])
    started = time.perf_counter()
    inputs @ weight.T
    elapsed = max(time.perf_counter() - started, 1e-6)
    return merge_seconds, expert_bytes, max(2 * PROBE_TOKENS * weight.numel() / elapsed, 1.0)


# -- after the run ----------------------------------------------------------------------------
def summarize_run(job, refit_errors: Mapping[int, tuple[float, float]] | None, seconds: float) -> RunSummary:
    """The end-of-run summary of a published `job`: what OUT holds, measured on disk."""
    out = job.out.path
    warning = getattr(job, "expert_warning", None)
    return RunSummary(
        out_path=out,
        output=output_description(job),
        parameter_count=_stored_parameters(out),
        size_bytes=sum(os.path.getsize(path) for path in _files(out)),
        refit_errors=dict(refit_errors or {}),
        seconds=seconds,
        eval_command=eval_command(job),
        ignored_verdict=getattr(warning, "message", None) if warning is not None else None,
    )


def eval_command(job) -> str:
    """`mergekit-moe2dense eval MOE OUT...` on the calibration text (any held-out text is better)."""
    out = job.out.path
    models = [job.config.model.model.path]
    if job.output.plan_type is ClusterPlan:
        models += sorted(
            os.path.join(out, name)
            for name in os.listdir(out)
            if os.path.isfile(os.path.join(out, name, "config.json"))
        )
    else:
        models.append(out)
    calibration = job.config.calibration
    data = ["--data", calibration.dataset, "--seq-len", str(calibration.seq_len)] if calibration else ["--data", "TEXT"]
    return shlex.join(["mergekit-moe2dense", "eval", *models, *data])


def _files(root: str) -> list[str]:
    return [os.path.join(directory, name) for directory, _, names in os.walk(root) for name in names]


def _stored_parameters(root: str) -> int | None:
    """Parameters in the safetensors files under `root` (None: there are none)."""
    from safetensors import safe_open

    total, found = 0, False
    for path in _files(root):
        if path.endswith(".safetensors") and os.sep + "moe2dense" + os.sep not in path:
            found = True
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    total += int(torch.Size(shape).numel())
    return total if found else None


def _count(value: int | None) -> str:
    if value is None:
        return "an unknown number of"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _size(size: int | None) -> str:
    if size is None:
        return "an unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
