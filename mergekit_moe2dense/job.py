# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""One conversion: everything a run carries, validated before any expensive step.

`ConversionJob.prepare` does every cheap check (options, output directory, model,
shapes, method parameters, statistics file, calibration settings, what the output
needs and the space it takes: outputs/preflight.py) and returns the job that build.py
reads; the steps after it get small frozen values made here (`stream_settings`,
`refit_inputs`, `write_context`). The calibration text is tokenized once per job
(`job.batches`) and shared by the statistics pass and the re-fit.

A method that averages experts is checked against `inspect`'s weight similarity on a few layers
first: on experts that are not aligned it is logged as a warning before any work, and kept as
`job.expert_warning` for the end-of-run summary (the merge runs anyway).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from mergekit.options import MergeOptions

from mergekit_moe2dense.calibration import (
    RouterStatistics,
    StatisticsError,
    load_calibration_batches,
)
from mergekit_moe2dense.calibration.distributed import Ranks
from mergekit_moe2dense.calibration.engine import check_engine, stream_settings
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.card import calibration_summary
from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig, check_seq_len
from mergekit_moe2dense.devices import DeviceError, check_device
from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.finish import RefitInputs
from mergekit_moe2dense.graph import TensorIO
from mergekit_moe2dense.inspection import quick_verdict
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.methods import ExpertMethod, MethodParameters, get_method
from mergekit_moe2dense.options import check_options
from mergekit_moe2dense.output_dir import OutputDirectory
from mergekit_moe2dense.outputs import OutputKind, WriteContext, check_output, output_quantization
from mergekit_moe2dense.recommend import AVERAGING_METHODS, ExpertWarning, averaging_warning
from mergekit_moe2dense.statistics import resolve_stats_path

__all__ = ["ConversionJob", "check_expert_similarity"]

LOG = logging.getLogger(__name__)


def _check_devices(options: MergeOptions, calibration) -> None:
    """--device (cuda with --cuda: the merge, the calibration and the re-fit run there) and the
    devices a `calibration.device_map` places modules on exist here, before any work."""
    check_device(options.device or "cpu")
    placements = calibration.device_map if calibration and isinstance(calibration.device_map, dict) else {}
    for module, place in placements.items():
        if place in ("cpu", "disk"):
            continue
        try:
            check_device(f"cuda:{place}" if isinstance(place, int) else place)
        except DeviceError:
            raise ConfigError(
                f"calibration.device_map puts {repr(module) if module else 'the whole model'} on {place!r}, a device this machine "
                "cannot use; place it on an available device, or leave device_map out"
            ) from None


def check_expert_similarity(source: SourceModel, layers: list[MoELayer], merge_method: str) -> ExpertWarning | None:
    """The warning for an averaging method on experts that are not aligned, logged; None otherwise.
    Only averaging methods read expert weights for it: sampled units of two experts of the middle
    layer (`quick_verdict`), a few hundred units whatever the model's size."""
    if merge_method not in AVERAGING_METHODS:
        return None
    verdict = quick_verdict(source, layers[len(layers) // 2])
    warning = averaging_warning(merge_method, verdict)
    if warning is not None:
        LOG.warning(warning.message)
    return warning


@dataclass
class ConversionJob:
    config: Moe2DenseConfig
    source: SourceModel
    layers: list[MoELayer]
    method: ExpertMethod
    params: MethodParameters
    output: OutputKind
    out: OutputDirectory
    options: MergeOptions
    ranks: Ranks
    stats_path: str | None = None
    config_source: str | None = None  # the YAML text, recorded in the model card
    expert_warning: ExpertWarning | None = None  # an averaging method on experts inspect calls unaligned
    quantization: str = "none"  # what the output is written in (`output_quantization`)

    @classmethod
    def prepare(
        cls,
        config: Moe2DenseConfig,
        out_path: str,
        options: MergeOptions | None = None,
        *,
        stats_path: str | None = None,
        overwrite: bool = False,
        config_source: str | None = None,
    ) -> ConversionJob:
        options = options or MergeOptions()
        check_options(options)
        stats_path = resolve_stats_path(stats_path)
        method = get_method(config.merge_method)
        calibration = config.calibration
        _check_devices(options, calibration)
        out = OutputDirectory(
            out_path,
            overwrite=overwrite,
            inputs={
                "the source model": config.model.model.path,
                "the calibration data": calibration.dataset if calibration else None,
                "the --stats file": stats_path,
            },
        )
        out.check()
        source = SourceModel.open(config.model, trust_remote_code=options.trust_remote_code)
        check_seq_len(config.calibration, source.config)
        family, moe = source.family, source.config
        params = method.resolve_parameters(
            config.method_parameters, num_experts=family.num_experts(moe), top_k=family.top_k(moe)
        )
        output = OutputKind(method.plan_type(params))
        job = cls(
            config=config,
            source=source,
            layers=source.moe_layers(),
            method=method,
            params=params,
            output=output,
            out=out,
            options=options,
            ranks=Ranks.from_env(),
            stats_path=stats_path,
            config_source=config_source,
            quantization=output_quantization(
                config.output_quantization, source, output.plan_type, config.output_block_size
            ),
        )
        job._check_statistics_source()
        if calibration is not None and not stats_path:
            check_engine(source, calibration, job.device, job.ranks)
        check_output(output.plan_type, config.merge_method, params, source, calibration, stats_path)
        out.check_space(output.estimated_bytes(job))
        if job.ranks.is_main:
            job.expert_warning = check_expert_similarity(source, job.layers, config.merge_method)
        return job

    def _check_statistics_source(self) -> None:
        """Where the statistics will come from is settled, and a --stats file fits, before any work."""
        config, method, params = self.config, self.method, self.params
        if self.stats_path:
            stats = self.loaded_statistics
            if method.needs_router_inputs(params) and not stats.has_router_inputs:
                raise StatisticsError(
                    f"{config.merge_method} needs router inputs and {self.stats_path} has none; "
                    "recalibrate without --stats (or with calibration.record_router_inputs: true)"
                )
        elif config.calibration is None:
            if method.needs_statistics(params):
                raise ConfigError(f"{config.merge_method} needs a calibration: block (dataset, num_samples, ...)")
            if self.source.family.needs_statistics(self.source.config):
                raise ConfigError(
                    f"{self.source.family.name} models need a calibration: block even for {config.merge_method} "
                    "(the dense weights are scaled by calibrated router/shared-gate means)"
                )

    # -- what the steps read -------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.ranks.device(self.options.device or "cpu")

    @property
    def progress(self) -> bool:
        return not self.options.quiet and self.ranks.is_main

    @property
    def out_dtype(self) -> str | None:
        return self.config.out_dtype or self.config.dtype

    @functools.cached_property
    def io(self) -> TensorIO:
        return TensorIO.from_options(
            self.source.reference,
            self.config.dtype,
            self.out_dtype,
            self.options,
            self.quantization,
            self.config.output_block_size,
        )

    @functools.cached_property
    def fingerprint(self) -> dict:
        return self.source.fingerprint(self.layers)

    @functools.cached_property
    def loaded_statistics(self) -> RouterStatistics:
        stats = RouterStatistics.load(self.stats_path)
        stats.check_model(self.fingerprint, self.stats_path)
        return stats

    @functools.cached_property
    def batches(self) -> list:
        """The calibration token batches, tokenized once for every pass of the run."""
        if self.config.calibration is None:
            raise ConfigError(f"{self.config.merge_method} needs a calibration: block (dataset, num_samples, ...)")
        return load_calibration_batches(self.source.path, self.config.calibration)[1]

    # -- the values the later steps take ----------------------------------------------------
    def stream_settings(self) -> StreamSettings:
        """How the re-fit's layer stream runs (the calibration config's device, dtypes, spill dir)."""
        return stream_settings(self.config.calibration, self.device, progress=self.progress)

    def refit_inputs(self) -> RefitInputs | None:
        """What the re-fit reads (None: the parameters ask for none, and no tokenizing is done)."""
        if not self.params.needs_refit:
            return None
        return RefitInputs(self.source, self.batches, self.params, self.stream_settings(), self.out.staging)

    def write_context(self, stats: RouterStatistics | None) -> WriteContext:
        return WriteContext(
            source=self.source,
            layers=tuple(self.layers),
            io=self.io,
            options=self.options,
            out_dtype=self.out_dtype,
            config=self.config,
            method=self.method,
            params=self.params,
            config_source=self.config_source,
            stats_path=self.stats_path,
            calibration=calibration_summary(self, stats),
        )
