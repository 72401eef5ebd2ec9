# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration over ranks: each records its share of the batches, the shares are reduced.

One process is one rank (`Ranks` with world size 1): it records every batch and
exchanges nothing. Under `torchrun` / `accelerate launch` every rank tokenizes
the same calibration text into the same batches (the pipeline is seeded), runs
the forward pass on its share of them (round-robin, as batches are sorted by
length), and the statistics are reduced so that every rank ends with what one
process records, bit for bit given deterministic kernels:

- the token subsample is defined on global token indices over *all* batches, so
  each sampled token's slot is known to every rank; a rank writes only its own
  slots and the others stay zero, so an all-reduce sum assembles the sample
  buffer exactly (x + 0 == x);
- every batch records into statistics of its own, whose sums are all-reduced
  ([batches, L, E], one rank non-zero per row) and then added in batch order,
  the order one process adds them in; reducing per-rank totals would round
  differently.

Both engines split this way; with the layer-streaming one every rank streams
every layer through its own batches. Rank and world size come from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). A model that no one
device holds is placed by accelerate in one process (`calibration.device_map`),
not sharded here.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.layerwise import LayerVisitor
from mergekit_moe2dense.calibration.runner import RouterRecorder, TokenSample, _empty_statistics
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import MoEFamily
from mergekit_moe2dense.statistics import SUMS, RouterStatistics

__all__ = ["RankShare", "Ranks", "RecorderVisitor", "rank_batches"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the calibration's processes (one process: rank 0 of 1)."""

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

    def describe(self, task: str) -> str:
        """`task` as a progress bar names it: with the rank where there are several."""
        return f"{task} (rank {self.rank})" if self.distributed else task


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: batches come sorted by length, so every rank gets long and short ones."""
    return list(range(rank, num_batches, world_size))


class RankShare:
    """This rank's batches, each recording into statistics of its own, all sharing one
    sample buffer; `reduce` assembles what one process records over every batch.

    `begin(recorder, i)` points a `RouterRecorder` (from `recorder`) at batch `i`. The
    routers' inputs (`TokenSample.router_inputs`, one process only) go to one buffer,
    sized by the first batch that records into it and handed on from batch to batch.
    """

    def __init__(self, config, family: MoEFamily, batches: Sequence[TokenBatch], ranks: Ranks, sample: TokenSample):
        if sample.router_inputs and ranks.distributed:
            raise ConfigError("recording router inputs is not supported under torchrun; calibrate in one process")
        empty, self.sample_ids, self.tokens = _empty_statistics(
            config, family, batches, sample.max_token_samples, sample.seed
        )
        if sample.router_inputs:
            empty.router_inputs = torch.zeros((len(empty.layers), len(self.sample_ids), 0))
        if sample.expert_outputs and not family.contributions_in_forward:
            raise ConfigError(
                f"{family.name}: the Gram matrix of the experts' outputs (diversity and reap_softmax scores) "
                "is not recorded for this family; choose another score"
            )
        self.expert_outputs = sample.expert_outputs
        self.layers, self.num_experts, self.top_k = empty.layers, empty.num_experts, empty.top_k
        self.samples = empty.samples
        self.family, self.batches, self.ranks = family, batches, ranks
        kept = [int(batch.attention_mask.sum()) for batch in batches]
        self.offsets = list(itertools.accumulate(kept, initial=0))[:-1]  # kept tokens before each batch
        self.mine = rank_batches(len(batches), ranks.rank, ranks.world_size)
        self.mine_tokens = sum(kept[i] for i in self.mine)
        self.parts = {i: self._statistics() for i in self.mine}
        self.current = empty  # the statistics the recorder writes into now

    def _statistics(self) -> RouterStatistics:
        stats = RouterStatistics(self.layers, self.num_experts, self.top_k, samples=self.samples)
        if self.expert_outputs:
            stats.begin_expert_outputs()
        return stats

    def recorder(self, model: torch.nn.Module) -> RouterRecorder:
        return RouterRecorder(model, self.family, self.current, self.sample_ids)

    def begin(self, recorder: RouterRecorder, i: int) -> None:
        """Points `recorder` at batch `i` (its statistics, its place in the token order)."""
        part = self.parts[i]
        part.router_inputs = self.current.router_inputs  # one buffer: resized by the first batch recorded
        self.current = recorder.stats = part
        recorder.offset = self.offsets[i]
        recorder.begin_batch(self.batches[i])

    def reduce(self, device: str) -> RouterStatistics:
        """The statistics of every batch, on every rank (`device`: where this rank computed)."""
        size = (len(self.batches), len(self.layers), self.num_experts)
        per_batch = torch.zeros((len(SUMS), *size), dtype=torch.float64)
        shared_gate = torch.zeros(size[:2], dtype=torch.float64)
        for i, part in self.parts.items():
            for f, name in enumerate(SUMS):
                per_batch[f, i] = getattr(part, name)
            shared_gate[i] = part.shared_gate_sum
        samples = self.samples
        if self.ranks.distributed:
            comm = _comm_device(device)
            per_batch, shared_gate, samples = (_all_reduce(t, comm) for t in (per_batch, shared_gate, samples))
        stats = RouterStatistics(
            self.layers,
            self.num_experts,
            self.top_k,
            tokens=self.tokens,
            samples=samples,
            router_inputs=self.current.router_inputs,
        )
        for i in range(len(self.batches)):  # one process's summation order
            for f, name in enumerate(SUMS):
                getattr(stats, name).add_(per_batch[f, i])
            stats.shared_gate_sum.add_(shared_gate[i])
        if self.expert_outputs:
            self._reduce_expert_outputs(stats, device)
        return stats

    def _reduce_expert_outputs(self, stats: RouterStatistics, device: str) -> None:
        """The Gram matrices and full-softmax sums, per batch as the other sums (`reduce`)."""
        size = (len(self.batches), len(self.layers), self.num_experts)
        gram = torch.zeros((*size, self.num_experts), dtype=torch.float64)
        softmax = torch.zeros(size, dtype=torch.float64)
        for i, part in self.parts.items():
            gram[i], softmax[i] = part.output_gram, part.softmax_contribution_sum
        if self.ranks.distributed:
            comm = _comm_device(device)
            gram, softmax = (_all_reduce(t, comm) for t in (gram, softmax))
        stats.begin_expert_outputs()
        for i in range(len(self.batches)):
            stats.output_gram.add_(gram[i])
            stats.softmax_contribution_sum.add_(softmax[i])


class RecorderVisitor(LayerVisitor):
    """Router statistics on the layer loop: the recorder's hooks fire in each layer's
    advancing forward, and before each batch the share points the recorder at it (the
    stream's batch b is the share's `mine[b]`)."""

    def __init__(self, share: RankShare, recorder: RouterRecorder):
        self.share = share
        self.recorder = recorder

    def before_batch(self, batch: int) -> None:
        self.share.begin(self.recorder, self.share.mine[batch])

    def after_layer(self, stream, index: int) -> None:
        self.recorder.rewind()


def _comm_device(device: str) -> str:
    """gloo reduces CPU tensors, nccl device tensors."""
    return device if dist.get_backend() == "nccl" else "cpu"


def _all_reduce(tensor: torch.Tensor, device: str) -> torch.Tensor:
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.cpu()
