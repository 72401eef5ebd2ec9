# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The merge reads every checkpoint tensor once and holds one layer's experts at a time."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
from mergekit.options import MergeOptions

from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.checkpoint import SourceModel
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.graph import ReadTensor, open_readers


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_each_tensor_read_once_and_experts_freed_per_layer(random_moe, tmp_path, monkeypatch, layout):
    moe = random_moe[layout]
    loads, alive, peak = Counter(), set(), [0]
    original = ReadTensor.execute

    def counting(self):
        value = original(self)
        loads[self.tensor] += 1
        if ".experts." in self.tensor:
            key = (self.tensor, loads[self.tensor])
            alive.add(key)
            weakref.finalize(value, alive.discard, key)
            peak[0] = max(peak[0], len(alive))
        return value

    monkeypatch.setattr(ReadTensor, "execute", counting)
    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": str(moe)}], "dtype": "float32"}
    )
    build_dense(config, str(tmp_path / "dense"), MergeOptions(quiet=True))

    source = SourceModel.open(config.model)
    layers = source.moe_layers()
    assert set(loads) == set(source.tensor_names) - {layer.router for layer in layers}
    assert set(loads.values()) == {1}  # a fused gate_up_proj feeds gate and up from one read
    per_layer = len([name for name in layers[0].consumed if ".experts." in name])
    assert per_layer == (2 if layout == "fused" else 12)
    assert peak[0] <= per_layer  # the previous layer's experts are gone before the next loads
    assert not open_readers._readers  # the run's readers (and read-ahead threads) are closed
