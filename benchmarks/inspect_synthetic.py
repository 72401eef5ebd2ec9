# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What `inspect` reports on synthetic experts: independent, upcycled, upcycled then permuted.

    python benchmarks/inspect_synthetic.py [--hidden 32 --width 48 --experts 4]

Upcycled: every expert = one ancestor + noise of relative size `noise`; permuted: the same,
with each expert's hidden units shuffled (same functions, unaligned weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from mergekit_moe2dense.inspection import inspect_layer


def experts(kind: str, noise: float, num: int, width: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = {
        "gate": torch.randn(num, width, hidden, generator=g),
        "up": torch.randn(num, width, hidden, generator=g),
        "down": torch.randn(num, hidden, width, generator=g),
    }
    if kind == "independent":
        return weights
    weights = {p: w[:1] + noise * w for p, w in weights.items()}
    if kind == "permuted":
        for e in range(num):
            perm = torch.randperm(width, generator=g)
            weights["gate"][e] = weights["gate"][e][perm]
            weights["up"][e] = weights["up"][e][perm]
            weights["down"][e] = weights["down"][e][:, perm]
    return weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--max-units", type=int, default=512)
    args = parser.parse_args()
    print("| experts | noise | weight cos | unit identity | matched | chance | verdict | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("independent", "upcycled", "permuted"):
        for noise in (0.3, 1.0, 2.0) if kind != "independent" else (None,):
            start = time.perf_counter()
            r = inspect_layer(experts(kind, noise, args.experts, args.width, args.hidden), 0, args.max_units, 0)
            print(
                f"| {kind} | {noise if noise is not None else '-'} | {r.weight_cosine['all']:.3f} | {r.unit_identity:.3f} "
                f"| {r.unit_matched:.3f} | {r.unit_chance:.3f} | {r.verdict} | {time.perf_counter() - start:.2f} |"
            )


if __name__ == "__main__":
    main()
