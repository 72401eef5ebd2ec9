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

Rank and world size come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK). A model that does not fit one device is placed with accelerate's
device maps (`device_map="auto"` in `from_pretrained`), not sharded here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
import tqdm

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.runner import RouterRecorder, sample_token_ids
from mergekit_moe2dense.calibration.stats import SUMS, RouterStatistics
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import MoEFamily

__all__ = ["SUM_FIELDS", "Ranks", "collect_router_statistics_distributed", "rank_batches"]

SUM_FIELDS = SUMS  # every [L, E] running sum of RouterStatistics


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
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


def rank_batches(num_batches: int, rank: int, world_size: int) -> List[int]:
    """Round-robin: batches come sorted by length, so every rank gets long and short ones."""
    return list(range(rank, num_batches, world_size))


def collect_router_statistics_distributed(
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
    """`collect_router_statistics` over this rank's batches, reduced over the default group.

    Every rank returns the full statistics. Needs an initialized process group.
    """
    if record_router_inputs:
        raise ConfigError("recording router inputs is not supported under torchrun; calibrate in one process")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = model.config
    layers, num_experts, top_k = family.moe_layer_indices(config), family.num_experts(config), family.top_k(config)
    kept = [int(batch.attention_mask.sum()) for batch in batches]
    offsets = [sum(kept[:i]) for i in range(len(kept))]
    sample_ids = sample_token_ids(kept, max_token_samples, seed)
    samples = torch.zeros((len(layers), len(sample_ids), num_experts))
    per_batch = torch.zeros((len(SUM_FIELDS), len(batches), len(layers), num_experts), dtype=torch.float64)
    shared_gate = torch.zeros((len(batches), len(layers)), dtype=torch.float64)
    # gloo reduces CPU tensors, nccl device tensors
    comm_device = device if dist.get_backend() == "nccl" else "cpu"

    mine = rank_batches(len(batches), rank, world_size)
    model.eval()
    with torch.inference_mode():
        with tqdm.tqdm(total=len(mine), desc=f"Calibrating (rank {rank})", unit="batch", disable=not progress) as bar:
            for i in mine:
                part = RouterStatistics(layers, num_experts, top_k, samples=samples)
                with RouterRecorder(model, family, part, sample_ids) as recorder:
                    recorder.offset = offsets[i]
                    recorder.begin_batch(batches[i])
                    model(
                        input_ids=batches[i].input_ids.to(device),
                        attention_mask=batches[i].attention_mask.to(device),
                        use_cache=False,
                    )
                for f, name in enumerate(SUM_FIELDS):
                    per_batch[f, i] = getattr(part, name)
                shared_gate[i] = part.shared_gate_sum
                bar.update()

    per_batch, shared_gate, samples = (_all_reduce(t, comm_device) for t in (per_batch, shared_gate, samples))
    stats = RouterStatistics(layers, num_experts, top_k, tokens=sum(kept), samples=samples)
    for i in range(len(batches)):  # one process's summation order
        for f, name in enumerate(SUM_FIELDS):
            getattr(stats, name).add_(per_batch[f, i])
        stats.shared_gate_sum.add_(shared_gate[i])
    return stats


def _all_reduce(tensor: torch.Tensor, device: str) -> torch.Tensor:
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.cpu()
