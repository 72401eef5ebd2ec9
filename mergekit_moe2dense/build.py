# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Library entry point: validate -> calibrate -> weights -> run the graph -> publish.

Everything that can fail cheaply (config, method parameters, model family, shards,
output directory, statistics file) fails before the calibration forward pass.
The output is assembled in a sibling staging directory and renamed into place
only when complete, so an interrupted run never leaves a directory that looks
like a finished model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from mergekit.common import dtype_from_name
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions

from mergekit_moe2dense.calibration import (
    RouterStatistics,
    StatisticsError,
    collect_router_statistics,
    collect_router_statistics_layerwise,
    input_device,
    load_calibration_batches,
    load_moe,
)
from mergekit_moe2dense.calibration.sequential import refit_layers
from mergekit_moe2dense.calibration.distributed import (
    Ranks,
    collect_router_statistics_distributed,
    collect_router_statistics_layerwise_distributed,
)
from mergekit_moe2dense.card import write_model_card
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig, check_seq_len
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.graph import open_readers, plan_dense_merge, stash_tensors
from mergekit_moe2dense.methods import MethodError, get_method
from mergekit_moe2dense.plan import with_family_scales

LOG = logging.getLogger(__name__)

STATS_FILE = "router_stats.safetensors"
WEIGHTS_FILE = "expert_weights.json"
REFIT_DIR = "refit-"  # fitted tensors, inside the staging directory until the merge has read them
# Tokenizer and generation files copied from the MoE (mergekit's list).
TAGALONG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class OutputExistsError(Moe2DenseError, FileExistsError):
    """OUT is not empty and --overwrite was not given."""


@dataclass
class BuildResult:
    out_path: str
    layer_weights: torch.Tensor  # [L, E]; [k, L, E] for a method with several outputs
    parameters: Dict[str, Any]
    statistics: Optional[RouterStatistics]


def check_output_dir(out_path: str, overwrite: bool) -> None:
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise OutputExistsError(f"output path {out_path} exists and is not a directory")
    if os.path.isdir(out_path) and os.listdir(out_path) and not overwrite:
        raise OutputExistsError(f"output directory {out_path} is not empty; pass --overwrite to replace it")


def calibration_dtype(config: Moe2DenseConfig, device: str) -> torch.dtype:
    name = config.calibration.dtype if config.calibration else None
    return dtype_from_name(name or ("bfloat16" if device.startswith("cuda") else "float32"))


def calibration_engine(source: SourceModel, calibration, device: str) -> str:
    """`auto` streams layers when the checkpoint would take over half the free memory
    (unless a device map places the whole model)."""
    if calibration.engine != "auto":
        return calibration.engine
    if calibration.device_map is not None:
        return "full"
    size = sum(
        os.path.getsize(os.path.join(source.index.base_path, shard.filename)) for shard in source.index.shards
    )
    try:
        if device.startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no free-memory query on this platform
        return "full"
    return "full" if size < free / 2 else "layerwise"


def calibrate(
    source: SourceModel,
    config: Moe2DenseConfig,
    fingerprint: Dict[str, Any],
    options: MergeOptions,
    record_router_inputs: bool = False,
) -> RouterStatistics:
    if config.calibration is None:
        raise ConfigError(f"{config.merge_method} needs a calibration: block (dataset, num_samples, ...)")
    calibration = config.calibration
    _, batches = load_calibration_batches(source.path, calibration)
    ranks = Ranks.from_env()
    device = ranks.device(options.device or "cpu")
    dtype = calibration_dtype(config, device)
    engine = calibration_engine(source, calibration, device)
    if calibration.device_map is not None and (engine == "layerwise" or ranks.distributed):
        raise ConfigError(
            "calibration.device_map places one whole model: it needs engine: full, in one process "
            "(the layerwise engine holds one layer at a time; under torchrun each rank has its own GPU)"
        )
    ranks.init_process_group(device)
    if engine == "layerwise":
        streamed = (
            collect_router_statistics_layerwise_distributed if ranks.distributed else collect_router_statistics_layerwise
        )
        stats = streamed(
            source,
            batches,
            max_token_samples=calibration.max_token_samples,
            seed=calibration.seed,
            device=device,
            dtype=dtype,
            spill_dir=calibration.spill_dir,
            progress=not options.quiet and ranks.is_main,
            record_router_inputs=record_router_inputs or calibration.record_router_inputs,
        )
    else:
        collect = collect_router_statistics_distributed if ranks.distributed else collect_router_statistics
        model = load_moe(source.path, device=device, dtype=dtype, device_map=calibration.device_map)
        try:
            stats = collect(
                model,
                source.family,
                batches,
                max_token_samples=calibration.max_token_samples,
                seed=calibration.seed,
                device=str(input_device(model)),
                progress=not options.quiet and ranks.is_main,
                record_router_inputs=record_router_inputs or calibration.record_router_inputs,
            )
        finally:
            del model
    stats.metadata.update(
        model=str(source.reference),
        model_fingerprint=fingerprint,
        calibration=calibration.model_dump(mode="json"),
    )
    return stats


def build_dense(
    config: Moe2DenseConfig,
    out_path: str,
    options: Optional[MergeOptions] = None,
    *,
    stats_path: Optional[str] = None,
    overwrite: bool = False,
    config_source: Optional[str] = None,
) -> BuildResult:
    """Convert the MoE named in `config` into a dense model at `out_path`."""
    options = options or MergeOptions()
    method = get_method(config.merge_method)
    check_output_dir(out_path, overwrite)
    source = SourceModel.open(config.model, trust_remote_code=options.trust_remote_code)
    check_seq_len(config.calibration, source.config)
    family, moe_config = source.family, source.config
    num_experts, top_k = family.num_experts(moe_config), family.top_k(moe_config)
    params = method.resolve_parameters(config.method_parameters, num_experts=num_experts, top_k=top_k)
    if needs_refit(params) and config.calibration is None:
        raise ConfigError(
            f"the re-fit (refit: {params['refit']}, refit_gate_up: {params['refit_gate_up']}) needs a "
            "calibration: block (its data is what is fitted)"
        )
    layers = source.moe_layers()
    fingerprint = source.fingerprint(layers)

    if method.multi_output:
        from mergekit_moe2dense import multi

        if needs_refit(params):
            raise MethodError(f"{config.merge_method} writes several models and does not support refit")
        multi.check_output(source, config, params, stats_path)
    stats = None
    if stats_path:
        stats = RouterStatistics.load(stats_path)
        stats.check_model(fingerprint, stats_path)
        if method.needs_router_inputs(params) and not stats.has_router_inputs:
            raise StatisticsError(
                f"{config.merge_method} needs router inputs and {stats_path} has none; "
                "recalibrate without --stats (or with calibration.record_router_inputs: true)"
            )
    elif method.needs_statistics(params) or config.calibration is not None:
        stats = calibrate(source, config, fingerprint, options, method.needs_router_inputs(params))
    elif family.needs_statistics(moe_config):
        raise ConfigError(
            f"{family.name} models need a calibration: block even for {config.merge_method} "
            "(the dense weights are scaled by calibrated router/shared-gate means)"
        )

    if method.multi_output:
        clusters = method.cluster_weights(stats, params)
        weights = clusters.weights
        for cluster in weights:
            _check_weights(cluster, len(layers), num_experts)

        def write(staging):
            multi.write_outputs(source, config, params, layers, clusters, stats, staging, options, config_source)

    else:
        weights = method.layer_weights(stats, params, num_layers=len(layers), num_experts=num_experts)
        _check_weights(weights, len(layers), num_experts)

        def write(staging):
            plans = with_family_scales(method.layer_plans(layers, weights, stats, params), family, moe_config, stats)
            fitted_model = None
            if needs_refit(params):
                plans, fitted_model = refit(source, config, plans, params, staging, options)
            write_dense_model(
                source, config, params, layers, weights, plans, staging, options, config_source, fitted_model=fitted_model
            )
            if fitted_model is not None:
                shutil.rmtree(fitted_model.model.path)

    if not Ranks.from_env().is_main:  # under torchrun, rank 0 alone writes the model
        return BuildResult(out_path, weights, params, stats)
    staging = _staging_dir(out_path)
    try:
        write(staging)
        if stats is not None:
            stats.save(os.path.join(staging, STATS_FILE))
        _publish(staging, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(out_path, weights, params, stats)


def write_dense_model(
    source, config, params, layers, weights, plans, staging, options, config_source=None, extra=None, fitted_model=None
) -> None:
    """One complete dense model in `staging`: weights, config, tokenizer, expert_weights.json, card.

    `extra` adds keys to expert_weights.json (and lines to the card).
    """
    _write_dense(source, config, plans, staging, options, fitted_model)
    _write_weights(staging, config.merge_method, params, layers, weights, extra)
    if options.write_model_card:
        write_model_card(staging, config, params, layers, weights, config_source, extra)


def needs_refit(params) -> bool:
    return params["refit"] != "none" or params["refit_gate_up"] != "merge"


def refit(source, config, plans, params, staging, options):
    """Re-fit every layer's down projection on the sequential engine; the fitted
    tensors go to a safetensors file that the merge graph reads (plan.fitted)."""
    _, batches = load_calibration_batches(source.path, config.calibration)
    device = options.device or "cpu"
    result = refit_layers(
        source,
        plans,
        batches,
        mode=params["refit"],
        damping=params["refit_damping"],
        gate_up=params["refit_gate_up"],
        device=device,
        dtype=calibration_dtype(config, device),
        spill_dir=config.calibration.spill_dir,
        progress=not options.quiet,
    )
    for index, (before, after) in sorted(result.errors.items()):
        LOG.info("layer %d: relative MLP reconstruction error %.4g -> %.4g after refit", index, before, after)
    fitted = (("gate", "up") if params["refit_gate_up"] == "regmean" else ()) + (
        ("down",) if params["refit"] != "none" else ()
    )
    plans = [dataclasses.replace(plan, fitted=fitted) for plan in plans]
    return plans, stash_tensors(result.tensors, staging, REFIT_DIR)


def _write_dense(source, config, plans, staging, options, fitted_model=None) -> None:
    family = source.family
    widths = [_plan_width(source, plan) for plan in plans]
    dense_width = family.dense_layer_width(source.config)
    width = max(widths + [dense_width or 0])
    dense_config = family.dense_config(source.config, intermediate_size=width)
    converted = {plan.layer.index for plan in plans}
    dense_layers = [i for i in range(source.config.num_hidden_layers) if i not in converted]
    padded = set(widths) != {width} or (dense_width is not None and dense_width != width)
    out_dtype = config.out_dtype or config.dtype
    if out_dtype:
        dense_config.dtype = out_dtype
    targets = plan_dense_merge(
        model=source.reference,
        family=family,
        tensor_names=source.tensor_names,
        plans=plans,
        method=config.merge_method,
        out_path=staging,
        out_dtype=out_dtype,
        dtype=config.dtype,
        max_shard_size=options.out_shard_size,
        safe_serialization=options.safe_serialization,
        width=width if padded else None,
        dense_layers=dense_layers if dense_width is not None else (),
        zero_tensors={k: v for i in sorted(converted) for k, v in family.dense_zero_tensors(source.config, i).items()},
        fitted_model=fitted_model,
    )
    run_graph(targets, options)
    dense_config.save_pretrained(staging)
    copy_tokenizer(source, staging, options)


def run_graph(targets, options) -> None:
    LoaderCache().setup(options=options)  # for the LoadTensor tasks (computed tensors)
    device = options.device or "cpu"
    executor = Executor(
        targets=targets,
        math_device=device,
        storage_device=device if options.low_cpu_memory else "cpu",
    )
    try:
        for _ in executor.run(quiet=options.quiet, desc="Merging experts"):
            pass
    finally:
        open_readers.close_all()


def copy_tokenizer(source, staging, options) -> None:
    if options.copy_tokenizer:
        for name in TAGALONG_FILES:
            path = os.path.join(source.path, name)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(staging, name))


def _expert_width(source: SourceModel, gate) -> int:
    return source.reader.shape(gate)[0]


def _plan_width(source: SourceModel, plan) -> int:
    """Intermediate size of a layer's dense MLP: the sum of its blocks' widths."""
    layer = plan.layer
    return sum(
        _expert_width(source, (layer.shared_experts[b.shared] if b.shared is not None else layer.experts[0])["gate"])
        for b in plan.blocks
    )


def _check_weights(weights: torch.Tensor, num_layers: int, num_experts: int) -> None:
    """Guard every method's contract: finite, non-negative rows summing to one."""
    if weights.shape != (num_layers, num_experts):
        raise RuntimeError(f"method returned weights of shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise RuntimeError("method returned non-finite or negative expert weights")
    if not torch.allclose(weights.sum(-1), torch.ones(num_layers, dtype=weights.dtype), atol=1e-6):
        raise RuntimeError("method returned expert weights that do not sum to 1 per layer")


def _write_weights(staging: str, method: str, params, layers, weights: torch.Tensor, extra=None) -> None:
    payload = {
        "method": method,
        "parameters": params,
        "layer_indices": [layer.index for layer in layers],
        "layers": weights.tolist(),
        **(extra or {}),
    }
    with open(os.path.join(staging, WEIGHTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)


def _staging_dir(out_path: str) -> str:
    out_path = os.path.abspath(out_path)
    staging = f"{out_path}.incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def _publish(staging: str, out_path: str) -> None:
    """Swap the finished staging directory into place."""
    if os.path.isdir(out_path):
        shutil.rmtree(out_path)
    os.replace(staging, out_path)


def build_from_mergekit(merge_config, out_path: str, options: MergeOptions, config_source: Optional[str] = None) -> BuildResult:
    """Entry for stock `mergekit-yaml` (see `_mergekit_hook`).

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
