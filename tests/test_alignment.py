# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Alignment of experts' hidden units (alignment.py): exactness of permutations, recovery of them."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from mergekit_moe2dense.alignment import (
    activation_permutation,
    expert_intermediate,
    permute_expert,
    permuted_slices,
    unit_vectors,
    weight_permutation,
)
from mergekit_moe2dense.families import ExpertSlice
from mergekit_moe2dense.io.index import read_index
from mergekit_moe2dense.io.reader import TensorReader

ACT = torch.nn.functional.silu


def random_expert(generator, hidden=16, width=24) -> dict[str, torch.Tensor]:
    return {
        "gate": torch.randn(width, hidden, generator=generator),
        "up": torch.randn(width, hidden, generator=generator),
        "down": torch.randn(hidden, width, generator=generator),
    }


def output(expert, x):
    return expert_intermediate(expert, x, ACT) @ expert["down"].T


def test_a_permuted_expert_computes_the_same_function():
    generator = torch.Generator().manual_seed(0)
    expert, x = random_expert(generator), torch.randn(50, 16, generator=generator)
    permutation = torch.randperm(24, generator=generator)
    permuted = permute_expert(expert, permutation)
    assert not torch.equal(permuted["gate"], expert["gate"])
    torch.testing.assert_close(output(permuted, x), output(expert, x), rtol=1e-5, atol=1e-5)
    units = unit_vectors(expert["gate"], expert["up"], expert["down"])
    torch.testing.assert_close(unit_vectors(permuted["gate"], permuted["up"], permuted["down"]), units[permutation])


def test_weight_and_activation_matching_recover_the_permutation_of_a_noisy_copy():
    generator = torch.Generator().manual_seed(1)
    reference, x = random_expert(generator), torch.randn(400, 16, generator=generator)
    permutation = torch.randperm(24, generator=generator)
    copy = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in reference.items()}
    # the copy's unit i is the reference's unit inverse[i]; aligning must undo that
    shuffled = permute_expert(copy, torch.argsort(permutation))
    found = weight_permutation(reference, shuffled)
    assert torch.equal(found, permutation)
    aligned = permute_expert(shuffled, found)
    torch.testing.assert_close(aligned["gate"], copy["gate"])
    by_activation = activation_permutation(
        expert_intermediate(reference, x, ACT), expert_intermediate(shuffled, x, ACT)
    )
    assert torch.equal(by_activation, permutation)


def test_matching_unrelated_experts_is_no_permutation_of_a_copy():
    generator = torch.Generator().manual_seed(2)
    a, b = random_expert(generator), random_expert(generator)
    found = weight_permutation(a, b)
    assert sorted(found.tolist()) == list(range(24))  # always a permutation
    matched = permute_expert(b, found)
    # matching improves the unit cosine of unrelated experts only a little: far from a copy's 1
    units_a = unit_vectors(a["gate"], a["up"], a["down"])
    cosine = (units_a * unit_vectors(matched["gate"], matched["up"], matched["down"])).sum(1).mean()
    assert 0 < float(cosine) < 0.5


def test_a_permuted_slice_is_read_permuted(tmp_path):
    generator = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 8, 4, generator=generator)  # [E, 2I, H], I = 4
    down = torch.randn(2, 4, 4, generator=generator)  # [E, H, I]
    save_file({"gate_up": fused, "down": down}, str(tmp_path / "model.safetensors"))
    reader = TensorReader(read_index(str(tmp_path)))
    permutation = torch.tensor([2, 0, 3, 1])
    slices = permuted_slices(
        {
            "gate": ExpertSlice("gate_up", 1, (0, 4)),
            "up": ExpertSlice("gate_up", 1, (4, 8)),
            "down": ExpertSlice("down", 1),
        },
        permutation,
    )
    torch.testing.assert_close(reader.read_slice(slices["gate"]), fused[1, :4][permutation], rtol=0, atol=0)
    torch.testing.assert_close(reader.read_slice(slices["up"]), fused[1, 4:][permutation], rtol=0, atol=0)
    torch.testing.assert_close(reader.read_slice(slices["down"]), down[1][:, permutation], rtol=0, atol=0)
    out = torch.empty(4, 4)
    reader.read_slice(slices["down"], out=out)
    torch.testing.assert_close(out, down[1][:, permutation], rtol=0, atol=0)
    torch.testing.assert_close(slices["down"].take(down), down[1][:, permutation], rtol=0, atol=0)
    reader.close()
