# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Library entry point: prepare -> statistics -> plan -> refine -> finish -> write -> publish.

`estimate_build` stops after the preparation: what the run would write and an estimate of its
cost (run_report.py), nothing written, no calibration. A finished build reports what it wrote
(`BuildResult.summary`).

Everything that can fail cheaply (options, output directory, model, shapes,
method parameters, statistics file) fails in `ConversionJob.prepare`, before the
calibration forward pass. OUT is locked from then on and the output is assembled
in a staging directory that is renamed into place only when complete
(output_dir.py). Errors are `Moe2DenseError`s; the CLIs turn them into one line.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from mergekit.options import MergeOptions

from mergekit_moe2dense import finish
from mergekit_moe2dense.calibration import RouterStatistics, collect_statistics
from mergekit_moe2dense.config import CalibrationConfig, Moe2DenseConfig
from mergekit_moe2dense.job import ConversionJob
from mergekit_moe2dense.memory import bound_onednn_primitive_cache
from mergekit_moe2dense.methods import MethodParameters
from mergekit_moe2dense.outputs import STATS_FILE, WEIGHTS_FILE, write
from mergekit_moe2dense.run_report import RunEstimate, RunSummary, estimate_run, summarize_run

__all__ = [
    "STATS_FILE",
    "WEIGHTS_FILE",
    "BuildResult",
    "build_dense",
    "build_from_mergekit",
    "calibrate",
    "estimate_build",
]


@dataclass
class BuildResult:
    out_path: str
    layer_weights: torch.Tensor  # [L, E]; [k, L, E] for a method with several outputs
    parameters: MethodParameters
    statistics: RouterStatistics | None
    summary: RunSummary | None = None  # what was written (the process that wrote it; None on the others)


def build_dense(
    config: Moe2DenseConfig,
    out_path: str,
    options: MergeOptions | None = None,
    *,
    stats_path: str | None = None,
    overwrite: bool = False,
    config_source: str | None = None,
) -> BuildResult:
    """Convert the MoE named in `config` into the output its method asks for, at `out_path`."""
    started = time.perf_counter()
    bound_onednn_primitive_cache()
    job = ConversionJob.prepare(
        config, out_path, options, stats_path=stats_path, overwrite=overwrite, config_source=config_source
    )
    source, method, params = job.source, job.method, job.params
    refit_errors = None
    # Under torchrun every rank calibrates its share; rank 0 alone writes.
    with job.out if job.ranks.is_main else contextlib.nullcontext():
        stats = job.loaded_statistics if job.stats_path else _fresh_statistics(job)
        decided = method.plan(stats, params, job.layers)  # what the result reports, on every rank
        if job.ranks.is_main:
            plan = method.refine(decided, stats, params, source)
            plan = finish.family_scales(plan, source, stats)
            plan = finish.align(plan, source, stats)
            plan = finish.router_rows(plan, source, stats)
            plan = finish.refit(plan, job.refit_inputs())
            write(plan, job.write_context(stats), job.out.staging)
            save_statistics(stats, job.out.staging)
            job.out.publish()
            refit_errors = getattr(plan, "refit_errors", None)
    summary = summarize_run(job, refit_errors, time.perf_counter() - started) if job.ranks.is_main else None
    return BuildResult(job.out.path, decided.reported_weights, params, stats, summary)


def estimate_build(
    config: Moe2DenseConfig,
    out_path: str,
    options: MergeOptions | None = None,
    *,
    stats_path: str | None = None,
    overwrite: bool = False,
) -> RunEstimate:
    """What `build_dense` would do with these arguments, and an estimate of its time and peak
    memory: every check it makes before any work, then a probe of one layer; nothing is
    written (no OUT, no lock, no staging) and no calibration runs."""
    job = ConversionJob.prepare(config, out_path, options, stats_path=stats_path, overwrite=overwrite)
    return estimate_run(job)


def save_statistics(stats: RouterStatistics | None, staging: str) -> None:
    """The statistics in OUT/moe2dense/, where no loader takes them for weights (reused by --stats)."""
    if stats is None:
        return
    path = os.path.join(staging, STATS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stats.save(path)


def calibrate(
    source,
    batches: list,
    calibration: CalibrationConfig,
    *,
    device: str,
    progress: bool,
    record_router_inputs: bool = False,
    metadata: dict | None = None,
    record_expert_outputs: bool = False,
) -> RouterStatistics:
    """The router statistics of one calibration pass of `source` (an `io.source.SourceModel`) over
    `batches`; `metadata` (what the statistics were computed from) is recorded with them."""
    stats = collect_statistics(
        source,
        batches,
        calibration,
        device=device,
        progress=progress,
        record_router_inputs=record_router_inputs,
        record_expert_outputs=record_expert_outputs,
    )
    stats.metadata.update(metadata or {})
    return stats


def _fresh_statistics(job: ConversionJob) -> RouterStatistics | None:
    """The statistics of a calibration pass, or none (a method and family that need none,
    without a calibration block)."""
    calibration = job.config.calibration
    if calibration is None:
        return None
    metadata = {
        "model": str(job.source.reference),
        "model_fingerprint": job.fingerprint,
        "calibration": calibration.model_dump(mode="json"),
    }
    return calibrate(
        job.source,
        job.batches,
        calibration,
        device=job.device,
        progress=job.progress,
        record_router_inputs=job.method.needs_router_inputs(job.params),
        metadata=metadata,
        record_expert_outputs=job.method.needs_expert_outputs(job.params),
    )


def build_from_mergekit(
    merge_config, out_path: str, options: MergeOptions, config_source: str | None = None
) -> BuildResult:
    """Entry for stock `mergekit-yaml` (see plugin/mergekit_moe2dense_hook.py).

    mergekit's config model drops keys it does not know, our `calibration:` block
    among them, so the raw YAML it read is parsed again with our strict schema.
    Errors are raised; mergekit-yaml's route (`cli_errors.run_mergekit_config`) turns
    them into its one-line messages.
    """
    if config_source is not None:
        config = Moe2DenseConfig.from_yaml(config_source)
    else:
        config = Moe2DenseConfig.model_validate(merge_config.model_dump(exclude_none=True))
    return build_dense(config, out_path, options, config_source=config_source)
