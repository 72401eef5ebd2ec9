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
    collect_router_statistics,
    collect_router_statistics_layerwise,
    load_calibration_batches,
    load_moe,
)
from mergekit_moe2dense.calibration.distributed import Ranks, collect_router_statistics_distributed
from mergekit_moe2dense.card import write_model_card
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.graph import plan_dense_merge
from mergekit_moe2dense.methods import get_method

LOG = logging.getLogger(__name__)

STATS_FILE = "router_stats.safetensors"
WEIGHTS_FILE = "expert_weights.json"
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
    layer_weights: torch.Tensor  # [L, E]
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
    """`auto` streams layers when the checkpoint would take over half the free memory."""
    if calibration.engine != "auto":
        return calibration.engine
    size = sum(
        os.path.getsize(os.path.join(source.index.base_path, shard.filename)) for shard in source.index.shards
    )
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return "full" if size < free / 2 else "layerwise"


def calibrate(
    source: SourceModel, config: Moe2DenseConfig, fingerprint: Dict[str, Any], options: MergeOptions
) -> RouterStatistics:
    if config.calibration is None:
        raise ConfigError(f"{config.merge_method} needs a calibration: block (dataset, num_samples, ...)")
    calibration = config.calibration
    _, batches = load_calibration_batches(source.path, calibration)
    ranks = Ranks.from_env()
    device = ranks.device(options.device or "cpu")
    dtype = calibration_dtype(config, device)
    engine = calibration_engine(source, calibration, device)
    if engine == "layerwise" and ranks.distributed:
        raise ConfigError(
            "calibration engine layerwise runs in one process; under torchrun set calibration.engine: full"
        )
    if engine == "layerwise":
        stats = collect_router_statistics_layerwise(
            source,
            batches,
            max_token_samples=calibration.max_token_samples,
            seed=calibration.seed,
            device=device,
            dtype=dtype,
            spill_dir=calibration.spill_dir,
            progress=not options.quiet,
        )
    else:
        ranks.init_process_group(device)
        collect = collect_router_statistics_distributed if ranks.distributed else collect_router_statistics
        model = load_moe(source.path, device=device, dtype=dtype)
        try:
            stats = collect(
                model,
                source.family,
                batches,
                max_token_samples=calibration.max_token_samples,
                seed=calibration.seed,
                device=device,
                progress=not options.quiet and ranks.is_main,
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
    family, moe_config = source.family, source.config
    num_experts, top_k = family.num_experts(moe_config), family.top_k(moe_config)
    params = method.resolve_parameters(config.method_parameters, num_experts=num_experts, top_k=top_k)
    layers = source.moe_layers()
    fingerprint = source.fingerprint(layers)

    stats = None
    if stats_path:
        stats = RouterStatistics.load(stats_path)
        stats.check_model(fingerprint, stats_path)
    elif method.needs_statistics(params) or config.calibration is not None:
        stats = calibrate(source, config, fingerprint, options)

    weights = method.layer_weights(stats, params, num_layers=len(layers), num_experts=num_experts)
    _check_weights(weights, len(layers), num_experts)
    if not Ranks.from_env().is_main:  # under torchrun, rank 0 alone writes the model
        return BuildResult(out_path, weights, params, stats)

    staging = _staging_dir(out_path)
    try:
        _write_dense(source, config, method.layer_plans(layers, weights, stats, params), staging, options)
        if stats is not None:
            stats.save(os.path.join(staging, STATS_FILE))
        _write_weights(staging, config.merge_method, params, layers, weights)
        if options.write_model_card:
            write_model_card(staging, config, params, layers, weights, config_source)
        _publish(staging, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(out_path, weights, params, stats)


def _write_dense(source, config, plans, staging, options) -> None:
    family = source.family
    width = _expert_width(source, plans[0].layer.experts[0]["gate"]) * len(plans[0].blocks)
    dense_config = family.dense_config(source.config, intermediate_size=width)
    out_dtype = config.out_dtype or config.dtype
    if out_dtype:
        dense_config.dtype = out_dtype
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
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
    )
    device = options.device or "cpu"
    executor = Executor(
        targets=targets,
        math_device=device,
        storage_device=device if options.low_cpu_memory else "cpu",
    )
    for _ in executor.run(quiet=options.quiet, desc="Merging experts"):
        pass
    dense_config.save_pretrained(staging)
    if options.copy_tokenizer:
        for name in TAGALONG_FILES:
            path = os.path.join(source.path, name)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(staging, name))


def _expert_width(source: SourceModel, gate) -> int:
    loader = source.reference.lazy_loader()
    return int(gate.take(loader.get_tensor(gate.tensor)).shape[0])


def _check_weights(weights: torch.Tensor, num_layers: int, num_experts: int) -> None:
    """Guard every method's contract: finite, non-negative rows summing to one."""
    if weights.shape != (num_layers, num_experts):
        raise RuntimeError(f"method returned weights of shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise RuntimeError("method returned non-finite or negative expert weights")
    if not torch.allclose(weights.sum(-1), torch.ones(num_layers, dtype=weights.dtype), atol=1e-6):
        raise RuntimeError("method returned expert weights that do not sum to 1 per layer")


def _write_weights(staging: str, method: str, params, layers, weights: torch.Tensor) -> None:
    payload = {
        "method": method,
        "parameters": params,
        "layer_indices": [layer.index for layer in layers],
        "layers": weights.tolist(),
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
        options.apply_global_options()
        return build_dense(config, out_path, options, config_source=config_source)
    except Moe2DenseError as error:
        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(str(error)) from None
