# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`SpilledTensors`: a {name: tensor} mapping that keeps a few MB in memory and the rest on disk,
where the re-fit leaves its fitted projections until the write graph reads them."""

from __future__ import annotations

import os
import uuid
from collections.abc import MutableMapping

import torch
from safetensors.torch import load_file, save_file

__all__ = ["SpilledTensors"]


class SpilledTensors(MutableMapping):
    """A {name: tensor} mapping that holds at most `keep_bytes` in memory: past that, each tensor
    set is written at once to its own safetensors file under `directory` (created then) and read
    back when looked up. The re-fit's fitted projections go here, so a conversion does not hold one
    per layer in memory (2.4 GB of float32 for 164 layers of the 30 GB benchmark), while a small
    model's stay in memory, handed to the graph without a round trip through the disk."""

    # small: at the re-fit's peak (its last layers) 64 MB held here were 64 MB over its target
    # (1.05 against 0.98 GB on the 4 GB benchmark; docs/benchmarks.md), while a test-sized model's
    # fitted tensors all stay in memory
    KEEP_BYTES = 8 << 20

    def __init__(self, directory: str, keep_bytes: int | None = None):
        self.directory = directory
        self.keep_bytes = self.KEEP_BYTES if keep_bytes is None else keep_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        if name in self:
            del self[name]
        tensor = tensor.detach().cpu().contiguous()
        held = sum(t.numel() * t.element_size() for t in self._held.values())
        if held + tensor.numel() * tensor.element_size() <= self.keep_bytes:
            self._held[name] = tensor
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{len(self._files):06d}-{uuid.uuid4().hex[:8]}.safetensors")
        save_file({"tensor": tensor}, path)
        self._files[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        return load_file(self._files[name])["tensor"]

    def __delitem__(self, name: str) -> None:
        if self._held.pop(name, None) is None:
            os.remove(self._files.pop(name))

    def __iter__(self):
        return iter([*self._held, *self._files])

    def __len__(self) -> int:
        return len(self._held) + len(self._files)

    def __contains__(self, name) -> bool:
        return name in self._held or name in self._files
