# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Smaller MoEs benchmark: 8 experts -> 6 and 4 by pruning (each score) and by merging
(with and without alignment, with and without the block re-fit), against the k-means
rebuilt MoE and the best dense model of the MoE's active width.

One calibration pass on the testbed's calib split is shared by every variant (`--stats`);
every model is scored on the held-out test split with `evaluate.evaluate_perplexity`.

    MOE2DENSE_CACHE=/work/cache python benchmarks/prune.py --preset example
    MOE2DENSE_CACHE=/work/cache python benchmarks/prune.py --preset scratch
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import Variant, build_variant, calibrate_once, score  # noqa: E402
from benchmarks.testbed import PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.methods import METHODS  # noqa: E402
from mergekit_moe2dense.perplexity import load_eval_documents  # noqa: E402


def variants(num_experts: int, top_k: int, refit: bool) -> list[Variant]:
    out = []
    for n in (num_experts * 3 // 4, num_experts // 2):  # 8 experts: 6 and 4
        group = f"{n} of {num_experts} experts"
        out += [
            Variant(f"prune {n} by {s}", "prune_experts", {"num_experts": n, "score": s}, group)
            for s in ("reap", "frequency", "contribution")
        ]
        for grouping in ("outputs", "router"):
            for align in ("none", "weights", "activations"):
                if grouping == "router" and align == "activations":
                    continue
                params = {"num_experts": n, "grouping": grouping, "align": align}
                out.append(Variant(f"merge {n} by {grouping}, align {align}", "merge_experts", params, group))
        out.append(
            Variant(
                f"merge {n} by outputs, align weights, fitted router",
                "merge_experts",
                {"num_experts": n, "router": "fitted"},
                group,
            )
        )
        if refit:
            out += [
                *(
                    Variant(
                        f"prune {n} by {s} + refit",
                        "prune_experts",
                        {"num_experts": n, "score": s, "refit": "down_proj"},
                        group,
                    )
                    for s in ("reap", "frequency")
                ),
                Variant(
                    f"merge {n} by outputs, align weights + refit",
                    "merge_experts",
                    {"num_experts": n, "refit": "down_proj"},
                    group,
                ),
            ]
        out.append(
            Variant(
                f"kmeans k={n} -> MoE top-{top_k} (closed form)",
                "kmeans_multi_dense",
                {"num_clusters": n, "output": "moe", "moe_top_k": top_k},
                group,
            )
        )
    out += [
        Variant(
            f"dense: concat m={top_k} + refit (active width)",
            "concat",
            {"num_experts": top_k, "refit": "down_proj"},
            "dense",
        ),
        Variant("dense: max_contribution + refit (1 expert)", "max_contribution", {"refit": "down_proj"}, "dense"),
    ]
    return [v for v in out if v.method in METHODS]


def run(
    preset: str,
    max_tokens: int,
    refit: bool,
    work_dir: str | None,
    only: str | None = None,
    cache_dir: str | None = None,
) -> str:
    started = time.time()
    testbed = build_testbed(preset, cache_dir=cache_dir)
    moe_config = json.loads((testbed.moe / "config.json").read_text())
    num_experts = moe_config.get("num_local_experts") or moe_config["num_experts"]
    top_k = moe_config["num_experts_per_tok"]
    seq_len = min(256, moe_config.get("max_position_embeddings", 256))
    calibration = {
        "num_samples": 128,
        "seq_len": seq_len,
        "batch_size": 8,
        "max_token_samples": 4096,  # the tokens whose expert outputs group experts
        "record_router_inputs": True,
    }
    documents = load_eval_documents(testbed.test_dir)
    work = Path(work_dir or tempfile.mkdtemp(prefix="moe2dense-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stats = calibrate_once(
            Variant("calibration", "prune_experts", {"num_experts": num_experts}), testbed, work, calibration
        )
        moe = score(testbed.moe, documents, seq_len, max_tokens, "MoE")
        rows = [(f"MoE ({num_experts} experts, top-{top_k})", "reference", moe)]
        if testbed.ancestor is not None:
            rows.append(("ancestor (dense)", "reference", score(testbed.ancestor, documents, seq_len, max_tokens, "a")))
        for variant in variants(num_experts, top_k, refit):
            if only and only not in variant.label:
                continue
            out = build_variant(variant, testbed.moe, testbed.calib_dir, work / "model", stats, calibration)
            rows.append((variant.label, variant.group, score(out, documents, seq_len, max_tokens, variant.label)))
            print(f"  {variant.label}: ppl {rows[-1][2].perplexity:.2f}", file=sys.stderr)
        lines = ["| model | group | ppl | ratio to MoE |", "|---|---|---|---|"]
        lines += [
            f"| {label} | {group} | {r.perplexity:.2f} | {r.perplexity / moe.perplexity:.3f} |"
            for label, group, r in rows
        ]
        lines.append(f"\n{preset}: {time.time() - started:.0f} s, {max_tokens} scored tokens per test domain")
        return "\n".join(lines)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="example", choices=sorted(PRESETS))
    parser.add_argument("--max-tokens", type=int, default=20000, help="scored tokens per test domain")
    parser.add_argument("--no-refit", action="store_true", help="leave out the re-fitted variants")
    parser.add_argument("--only", default=None, help="only the variants whose label contains this text")
    parser.add_argument("--work-dir", default=None, help="keep built models here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    print(run(args.preset, args.max_tokens, not args.no_refit, args.work_dir, args.only))


if __name__ == "__main__":
    main()
