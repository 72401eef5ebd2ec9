# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Running a write graph: mergekit's executor, the merge's CPU settings, and the end of the
run's resources (its readers closed, writers that never finished stopped), whatever happens."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from mergekit.graph import Executor, Task

from mergekit_moe2dense.graph.resources import graph_resources
from mergekit_moe2dense.io.writer import abort_open_writers

__all__ = ["run_graph"]


def run_graph(targets: list[Task], options, desc: str = "Merging experts") -> None:
    """Execute the write graph with mergekit's executor; the run's readers are closed after."""
    device = options.device or "cpu"
    try:
        executor = Executor(
            targets=targets, math_device=device, storage_device=device if options.low_cpu_memory else "cpu"
        )
        with _lean_merge(device):
            for _ in executor.run(quiet=options.quiet, desc=desc):
                pass
    finally:
        graph_resources.close_readers()
        abort_open_writers()


@contextlib.contextmanager
def _lean_merge(device: str) -> Iterator[None]:
    """The merge's own CPU costs, kept below the disk's (docs/benchmarks.md, "Merge"):
    - the cyclic garbage collector is frozen on what exists (the imported libraries): each of
      its passes walked those objects again, ~10% of a merge's CPU time;
    - on the CPU, torch's intra-op threads leave two cores to the reader and writer
      threads: the merge's elementwise kernels are memory-bound, and intra-op threads that
      wait for a core taken by those made each add several times slower (8 GB merge on 2 cores,
      31.0 s with 2 threads, 23.3 s with 1)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, threads - 2))
    freeze = gc.get_freeze_count() == 0  # the command line froze them already
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
        torch.set_num_threads(threads)
