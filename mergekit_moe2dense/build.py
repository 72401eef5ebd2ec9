# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Library entry point: prepare -> statistics -> plan -> refine -> finish -> write -> publish.

Everything that can fail cheaply (options, output directory, model, shapes,
method parameters, statistics file) fails in `ConversionJob.prepare`, before the
calibration forward pass. OUT is locked from then on and the output is assembled
in a staging directory that is renamed into place only when complete
(output_dir.py). Errors are `Moe2DenseError`s; the CLIs turn them into one line.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from mergekit.options import MergeOptions

from mergekit_moe2dense import finish
from mergekit_moe2dense.calibration import RouterStatistics, collect_statistics
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.job import ConversionJob
from mergekit_moe2dense.memory import bound_onednn_primitive_cache
from mergekit_moe2dense.methods import MethodParameters
from mergekit_moe2dense.outputs import STATS_FILE, WEIGHTS_FILE, write

__all__ = ["STATS_FILE", "WEIGHTS_FILE", "BuildResult", "build_dense", "build_from_mergekit", "calibrate"]


@dataclass
class BuildResult:
    out_path: str
    layer_weights: torch.Tensor  # [L, E]; [k, L, E] for a method with several outputs
    parameters: MethodParameters
    statistics: RouterStatistics | None


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
    bound_onednn_primitive_cache()
    job = ConversionJob.prepare(
        config, out_path, options, stats_path=stats_path, overwrite=overwrite, config_source=config_source
    )
    source, method, params = job.source, job.method, job.params
    # Under torchrun every rank calibrates its share; rank 0 alone writes.
    with job.out if job.ranks.is_main else contextlib.nullcontext():
        stats = job.loaded_statistics if job.stats_path else calibrate(job)
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
    return BuildResult(job.out.path, decided.reported_weights, params, stats)


def save_statistics(stats: RouterStatistics | None, staging: str) -> None:
    """The statistics in OUT/moe2dense/, where no loader takes them for weights (reused by --stats)."""
    if stats is None:
        return
    path = os.path.join(staging, STATS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stats.save(path)


def calibrate(job: ConversionJob) -> RouterStatistics | None:
    """The router statistics from a calibration pass, or none (a method and family that
    need none, without a calibration block)."""
    if job.config.calibration is None:
        return None
    stats = collect_statistics(
        job.source,
        job.batches,
        job.config.calibration,
        device=job.device,
        progress=job.progress,
        record_router_inputs=job.method.needs_router_inputs(job.params),
    )
    stats.metadata.update(
        model=str(job.source.reference),
        model_fingerprint=job.fingerprint,
        calibration=job.config.calibration.model_dump(mode="json"),
    )
    return stats


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
