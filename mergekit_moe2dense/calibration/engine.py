# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The one calibration entry point: token batches -> RouterStatistics.

`collect_statistics` decides, in one place, everything a calibration run
depends on besides its batches: the dtypes and the layer stream's settings
(`calibration_dtype`, `compute_dtype`, `stream_settings`), the engine
(`calibration_engine`: the whole model, placed on one device or by accelerate's
`device_map`; or the layer stream), and the ranks (one process is one rank;
under torchrun each rank runs its share of the batches and the statistics are
reduced: `distributed.RankShare`). The build, `inspect` and the benchmarks all
calibrate through it; the caller tokenizes once (`load_calibration_batches`)
and passes the same batches to the re-fit.
"""

from __future__ import annotations

import os

import torch
import tqdm
from mergekit.common import dtype_from_name

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.distributed import Ranks, RankShare, RecorderVisitor
from mergekit_moe2dense.calibration.layerwise import LayerStream, layer_compute_dtype
from mergekit_moe2dense.calibration.runner import TokenSample, input_device, load_moe
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.config import CalibrationConfig, ConfigError
from mergekit_moe2dense.memory import bound_onednn_primitive_cache
from mergekit_moe2dense.statistics import RouterStatistics

__all__ = ["calibration_dtype", "calibration_engine", "collect_statistics", "compute_dtype", "stream_settings"]


def calibration_dtype(calibration: CalibrationConfig | None, device: str) -> torch.dtype:
    """The calibration's `dtype`, else bfloat16 on a GPU and float32 on the CPU (for the
    statistics forward and the re-fit alike)."""
    name = calibration.dtype if calibration is not None else None
    return dtype_from_name(name or ("bfloat16" if device.startswith("cuda") else "float32"))


def compute_dtype(calibration: CalibrationConfig | None, device: str) -> torch.dtype:
    """The dtype the layer-streamed passes (the layerwise engine, the re-fits) hold and compute
    each layer in: the calibration's `compute_dtype`, or with `auto` float32 for a 16-bit
    calibration on a CPU without native matmuls in that dtype, else the calibration dtype
    (`layerwise.layer_compute_dtype`)."""
    requested = calibration.compute_dtype if calibration is not None else "auto"
    return layer_compute_dtype(
        calibration_dtype(calibration, device), device, None if requested == "auto" else dtype_from_name(requested)
    )


def stream_settings(calibration: CalibrationConfig | None, device: str, *, progress: bool = True) -> StreamSettings:
    """The settings every layer-streamed pass of a run shares, from its calibration config:
    the calibration dtype, the layers' compute dtype, and the spill directory."""
    return StreamSettings(
        device=device,
        dtype=calibration_dtype(calibration, device),
        compute_dtype=compute_dtype(calibration, device),
        spill_dir=calibration.spill_dir if calibration is not None else None,
        progress=progress,
    )


def calibration_engine(source, calibration: CalibrationConfig, device: str) -> str:
    """`full` or `layerwise`. `auto` streams layers when the checkpoint would take over
    half the free memory (unless a device map places the whole model), and always for a
    quantized checkpoint (dequantized on read by the stream's reader, never by transformers)."""
    quantized = bool(getattr(source.index, "quantized", None))
    if calibration.engine == "full" and quantized:
        raise ConfigError(
            "calibration.engine: full loads the model with transformers, which keeps FP8/MXFP4 weights quantized; "
            "use engine: layerwise (or auto), which dequantizes them on read"
        )
    if calibration.engine != "auto":
        return calibration.engine
    if quantized:
        return "layerwise"
    if calibration.device_map is not None:
        return "full"
    size = sum(os.path.getsize(os.path.join(source.index.base_path, shard.filename)) for shard in source.index.shards)
    try:
        if device.startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no free-memory query on this platform
        return "full"
    return "full" if size < free / 2 else "layerwise"


def check_engine(source, calibration: CalibrationConfig, device: str, ranks: Ranks) -> str:
    """The engine this calibration will run on, refusing combinations that cannot work
    (cheap: called before any work, and again when the pass starts)."""
    engine = calibration_engine(source, calibration, device)
    if calibration.device_map is not None and (engine == "layerwise" or ranks.distributed):
        raise ConfigError(
            "calibration.device_map places one whole model: it needs engine: full, in one process "
            "(the layerwise engine holds one layer at a time; under torchrun each rank has its own GPU)"
        )
    return engine


def collect_statistics(
    source,
    batches: list[TokenBatch],
    calibration: CalibrationConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
    record_router_inputs: bool = False,
    ranks: Ranks | None = None,
    record_expert_outputs: bool = False,
) -> RouterStatistics:
    """Router statistics of `source` (a `io.source.SourceModel`) over `batches`.

    `calibration` gives the engine, dtype, token sample (`max_token_samples`, `seed`),
    `spill_dir` and `device_map`; `record_router_inputs` (or the calibration's own)
    also keeps the routers' inputs of the sampled tokens, `record_expert_outputs` the Gram
    matrix of every expert's outputs on them and the full-softmax saliency. Under torchrun (`ranks`,
    by default from the environment) every rank gets the same, full statistics.
    """
    bound_onednn_primitive_cache()
    ranks = ranks or Ranks.from_env()
    device = ranks.device(device)
    engine = check_engine(source, calibration, device, ranks)
    ranks.init_process_group(device)
    stream = stream_settings(calibration, device, progress=progress and ranks.is_main)
    sample = TokenSample(
        calibration.max_token_samples,
        calibration.seed,
        router_inputs=record_router_inputs or calibration.record_router_inputs,
        expert_outputs=record_expert_outputs,
    )
    if engine == "layerwise":
        stats = _collect_layerwise(source, batches, ranks, sample, stream=stream)
        layers = stream.compute_dtype
    else:
        stats = _collect_full(source, batches, ranks, sample, stream=stream, device_map=calibration.device_map)
        layers = stream.dtype  # the whole model in the calibration dtype
    # what the statistics were computed with, saved with them
    stats.metadata.update(engine=engine, dtype=_name(stream.dtype), compute_dtype=_name(layers))
    return stats


def _collect_full(
    source, batches: list[TokenBatch], ranks: Ranks, sample: TokenSample, *, stream: StreamSettings, device_map
) -> RouterStatistics:
    """The whole model's forward over this rank's batches, recording every router."""
    model = load_moe(source.path, device=stream.device, dtype=stream.dtype, device_map=device_map)
    try:
        device = input_device(model)
        share = RankShare(model.config, source.family, batches, ranks, sample)
        model.eval()
        desc = ranks.describe("Calibrating")
        with share.recorder(model) as recorder, torch.inference_mode():
            with tqdm.tqdm(total=share.mine_tokens, desc=desc, unit="tok", disable=not stream.progress) as bar:
                for i in share.mine:
                    share.begin(recorder, i)
                    batch = batches[i]
                    model(
                        input_ids=batch.input_ids.to(device),
                        attention_mask=batch.attention_mask.to(device),
                        use_cache=False,
                    )
                    bar.update(int(batch.attention_mask.sum()))
        return share.reduce(str(device))
    finally:
        del model  # the whole model: freed before the merge starts, even when the pass fails


def _collect_layerwise(
    source, batches: list[TokenBatch], ranks: Ranks, sample: TokenSample, *, stream: StreamSettings
) -> RouterStatistics:
    """The same statistics as `_collect_full`, streaming the checkpoint one decoder layer at a
    time (layerwise.py): every rank streams every layer through its own batches."""
    share = RankShare(source.config, source.family, batches, ranks, sample)
    mine = [batches[i] for i in share.mine]
    layers = LayerStream.of(source, mine, stream)
    with layers, share.recorder(layers.model) as recorder:
        layers.run(RecorderVisitor(share, recorder), desc=ranks.describe("Calibrating"), progress=stream.progress)
    return share.reduce(stream.device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
