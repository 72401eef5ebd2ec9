# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Library entry point: validate -> calibrate -> weights -> plan -> write -> publish.

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

from mergekit_moe2dense.calibration import RouterStatistics, collect_statistics
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.job import ConversionJob
from mergekit_moe2dense.memory import bound_onednn_primitive_cache
from mergekit_moe2dense.methods import MethodParameters
from mergekit_moe2dense.outputs import STATS_FILE, WEIGHTS_FILE

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
    # Under torchrun every rank calibrates its share; rank 0 alone writes.
    with job.out if job.ranks.is_main else contextlib.nullcontext():
        stats = job.loaded_statistics if job.stats_path else calibrate(job)
        result = job.method.plan(stats, job.params, job.layers)
        if job.ranks.is_main:
            planned = job.output.plan(job, result, stats)
            job.output.write(job, planned, job.out.staging)
            if stats is not None:  # in OUT/moe2dense/, where no loader takes it for weights
                path = os.path.join(job.out.staging, STATS_FILE)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                stats.save(path)
            job.out.publish()
    return BuildResult(job.out.path, job.output.reported_weights(result), job.params, stats)


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
    Errors become click's one-line messages when running under a click command.
    """
    import click

    try:
        if config_source is not None:
            config = Moe2DenseConfig.from_yaml(config_source)
        else:
            config = Moe2DenseConfig.model_validate(merge_config.model_dump(exclude_none=True))
        return build_dense(config, out_path, options, config_source=config_source)
    except Moe2DenseError as error:
        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(str(error)) from None
