# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration split across processes (`torchrun` / `accelerate launch`).

Every rank tokenizes the same calibration text into the same batches (the
pipeline is seeded), runs the forward pass on its share of them (round-robin,
as batches are sorted by length), and the statistics are reduced so that every
rank ends with what one process would have recorded, bit for bit given
deterministic kernels:

- the token subsample is defined on global token indices over *all* batches, so
  each sampled token's slot is known to every rank; a rank writes only its own
  slots and the others stay zero, so an all-reduce sum assembles the sample
  buffer exactly (x + 0 == x);
- sums are all-reduced per batch ([batches, L, E], one rank non-zero per row) and
  then added in batch order, the order one process adds them in; reducing the
  per-rank totals instead would round differently.

Both engines split this way; with the layer-streaming one every rank streams
every layer through its own batches. Rank and world size come from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). A model that no one
device holds is placed by accelerate in one process (`calibration.device_map`),
not sharded here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import tqdm

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerStream
from mergekit_moe2dense.calibration.runner import RecorderVisitor, RouterRecorder, sample_token_ids
from mergekit_moe2dense.calibration.stats import SUMS, RouterStatistics
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import MoEFamily

__all__ = ["Ranks", "rank_batches"]


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """One GPU per local rank; a bare `cuda` names this rank's GPU."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def init_process_group(self, device: str) -> None:
        """Joins the job torchrun started (no-op for one process or if already joined)."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: batches come sorted by length, so every rank gets long and short ones."""
    return list(range(rank, num_batches, world_size))


class _RankShare:
    """This rank's batches, each recording into its own statistics, all sharing one
    sample buffer; `reduce` assembles what one process would have recorded."""

    def __init__(self, config, family: MoEFamily, batches: Sequence[TokenBatch], max_token_samples: int, seed: int):
        self.layers, self.num_experts, self.top_k = (
            family.moe_layer_indices(config),
            family.num_experts(config),
            family.top_k(config),
        )
        self.batches = batches
        kept = [int(batch.attention_mask.sum()) for batch in batches]
        self.tokens = sum(kept)
        self.offsets = [sum(kept[:i]) for i in range(len(kept))]
        self.sample_ids = sample_token_ids(kept, max_token_samples, seed)
        self.samples = torch.zeros((len(self.layers), len(self.sample_ids), self.num_experts))
        self.mine = rank_batches(len(batches), dist.get_rank(), dist.get_world_size())
        self.parts = {i: self._statistics() for i in self.mine}

    def _statistics(self) -> RouterStatistics:
        return RouterStatistics(self.layers, self.num_experts, self.top_k, samples=self.samples)

    def recorder(self, model: torch.nn.Module, family: MoEFamily) -> RouterRecorder:
        first = self.parts[self.mine[0]] if self.mine else self._statistics()
        return RouterRecorder(model, family, first, self.sample_ids)

    def begin(self, recorder: RouterRecorder, i: int) -> None:
        """Points `recorder` at batch `i` (its statistics, its place in the token order)."""
        recorder.stats = self.parts[i]
        recorder.offset = self.offsets[i]
        recorder.begin_batch(self.batches[i])

    def reduce(self, comm_device: str) -> RouterStatistics:
        size = (len(self.batches), len(self.layers), self.num_experts)
        per_batch = torch.zeros((len(SUMS), *size), dtype=torch.float64)
        shared_gate = torch.zeros(size[:2], dtype=torch.float64)
        for i, part in self.parts.items():
            for f, name in enumerate(SUMS):
                per_batch[f, i] = getattr(part, name)
            shared_gate[i] = part.shared_gate_sum
        per_batch, shared_gate, samples = (_all_reduce(t, comm_device) for t in (per_batch, shared_gate, self.samples))
        stats = RouterStatistics(self.layers, self.num_experts, self.top_k, tokens=self.tokens, samples=samples)
        for i in range(len(self.batches)):  # one process's summation order
            for f, name in enumerate(SUMS):
                getattr(stats, name).add_(per_batch[f, i])
            stats.shared_gate_sum.add_(shared_gate[i])
        return stats


def _refuse_router_inputs(record_router_inputs: bool) -> None:
    if record_router_inputs:
        raise ConfigError("recording router inputs is not supported under torchrun; calibrate in one process")


def _collect_full_distributed(
    model: torch.nn.Module,
    family: MoEFamily,
    batches: Sequence[TokenBatch],
    *,
    max_token_samples: int,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    record_router_inputs: bool = False,
) -> RouterStatistics:
    """`runner._collect_full` over this rank's batches, reduced over the default group.

    Every rank returns the full statistics. Needs an initialized process group.
    """
    _refuse_router_inputs(record_router_inputs)
    share = _RankShare(model.config, family, batches, max_token_samples, seed)
    model.eval()
    with share.recorder(model, family) as recorder, torch.inference_mode():
        desc = f"Calibrating (rank {dist.get_rank()})"
        for i in tqdm.tqdm(share.mine, desc=desc, unit="batch", disable=not progress):
            share.begin(recorder, i)
            model(
                input_ids=batches[i].input_ids.to(device),
                attention_mask=batches[i].attention_mask.to(device),
                use_cache=False,
            )
    return share.reduce(_comm_device(device))


def _collect_layerwise_distributed(
    source,
    batches: Sequence[TokenBatch],
    *,
    max_token_samples: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    spill_dir: str | None = None,
    progress: bool = True,
    record_router_inputs: bool = False,
) -> RouterStatistics:
    """`runner._collect_layerwise` over this rank's batches, reduced over the
    default group: every rank streams every layer through its own share of the tokens."""
    _refuse_router_inputs(record_router_inputs)
    share = _RankShare(source.config, source.family, batches, max_token_samples, seed)
    mine = [batches[i] for i in share.mine]
    with LayerStream(
        source, mine, device=device, dtype=dtype, compute_dtype=compute_dtype, spill_dir=spill_dir
    ) as stream:
        with share.recorder(stream.model, source.family) as recorder:
            stream.run(
                RecorderVisitor(recorder, lambda b: share.begin(recorder, share.mine[b])),
                desc=f"Calibrating (rank {dist.get_rank()})",
                progress=progress,
            )
    return share.reduce(_comm_device(device))


def _comm_device(device: str) -> str:
    """gloo reduces CPU tensors, nccl device tensors."""
    return device if dist.get_backend() == "nccl" else "cpu"


def _all_reduce(tensor: torch.Tensor, device: str) -> torch.Tensor:
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.cpu()
