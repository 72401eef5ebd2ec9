# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What the write graph's tasks look up while it runs: the source's open readers and the
tensors computed in memory (fitted projections, new routers).

mergekit's tasks are frozen, hashable pydantic values (equal tasks are one node of the graph)
and its `Executor` calls `execute()` with the task's arguments only: a task cannot carry an open
file or a dict of tensors, nor be handed one by the executor. So a task holds a key (the model,
a store id) and looks the value up here. The one `GraphResources` of the process has an explicit
lifetime for each part: a store lives inside its `computed_tensors` block, and the readers from
the first read of a run to the end of that run (`graph.runner.run_graph` closes them).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Mapping

import torch
from mergekit.common import ModelReference

from mergekit_moe2dense.io.index import read_index
from mergekit_moe2dense.io.reader import READAHEAD_BYTES, TensorReader

__all__ = ["GraphResources", "graph_resources"]


class GraphResources:
    """One direct-reading `TensorReader` per source model while a graph runs (mergekit's
    `LoaderCache` plays this part for `LoadTensor`), and the in-memory tensors of the open
    `computed_tensors` blocks, by store id."""

    def __init__(self):
        self._readers: dict[str, TensorReader] = {}
        self._stores: dict[str, Mapping[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def reader(self, model: ModelReference) -> TensorReader:
        """The model's reader, opened on first use (closed by `close_readers`)."""
        path = model.local_path()
        with self._lock:
            if path not in self._readers:
                self._readers[path] = TensorReader(read_index(path), readahead=READAHEAD_BYTES, direct=True)
            return self._readers[path]

    def close_readers(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def tensor(self, store: str, name: str) -> torch.Tensor:
        return self._stores[store][name]

    @contextlib.contextmanager
    def holding(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[str]:
        """`tensors` under a new store id, for the duration of the block."""
        store = uuid.uuid4().hex
        self._stores[store] = tensors
        try:
            yield store
        finally:
            del self._stores[store]


graph_resources = GraphResources()
