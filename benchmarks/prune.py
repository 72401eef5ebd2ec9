# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Smaller MoEs benchmark: E experts -> fractions of them (`--fractions`, by default 3/4 and
1/2: 8 -> 6 and 4) by pruning (every score `prune_experts` takes) and by merging (with and
without alignment), each with and without the block re-fit, against the k-means rebuilt MoE
and the best dense model of the MoE's active width.

One calibration pass on the testbed's calib split, recording what every score needs (the
experts' output Gram matrix, the full-softmax saliency), is shared by every variant
(`--stats`); every model is scored on the held-out test split with
`evaluate.evaluate_perplexity`, overall and per domain.

    MOE2DENSE_CACHE=/work/cache python benchmarks/prune.py --preset example
    MOE2DENSE_CACHE=/work/cache python benchmarks/prune.py --preset scratch
    MOE2DENSE_CACHE=/tmp/m2dcache python benchmarks/prune.py --preset fine-qwen3 --fractions 0.5,0.25
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import Variant, build_variant, calibrate_once, score  # noqa: E402
from benchmarks.testbed import PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.methods import METHODS  # noqa: E402
from mergekit_moe2dense.methods.prune_experts import Saliency  # noqa: E402
from mergekit_moe2dense.perplexity import load_eval_documents  # noqa: E402

FRACTIONS = (0.75, 0.5)  # 8 experts: 6 and 4
SCORES = get_args(Saliency)  # every score prune_experts takes
NO_REFIT = {"refit": "none"}  # stated: the smaller-MoE methods re-fit by default


def sizes(num_experts: int, fractions) -> list[int]:
    """The smaller MoEs' expert counts, largest first, without repeats."""
    return sorted({max(1, round(num_experts * f)) for f in fractions}, reverse=True)


def variants(num_experts: int, top_k: int, refit: bool, fractions=FRACTIONS) -> list[Variant]:
    out = []
    for n in sizes(num_experts, fractions):
        group = f"{n} of {num_experts} experts"
        out += [
            Variant(f"prune {n} by {s}", "prune_experts", {"num_experts": n, "score": s, **NO_REFIT}, group)
            for s in SCORES
        ]
        for grouping in ("outputs", "router"):
            for align in ("none", "weights", "activations"):
                if grouping == "router" and align == "activations":
                    continue
                params = {"num_experts": n, "grouping": grouping, "align": align, **NO_REFIT}
                out.append(Variant(f"merge {n} by {grouping}, align {align}", "merge_experts", params, group))
        out.append(
            Variant(
                f"merge {n} by outputs, align weights, fitted router",
                "merge_experts",
                {"num_experts": n, "router": "fitted", **NO_REFIT},
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
                    for s in SCORES
                ),
                Variant(
                    f"merge {n} by outputs, align weights + refit",
                    "merge_experts",
                    {"num_experts": n, "refit": "down_proj"},
                    group,
                ),
                Variant(
                    f"merge {n} by router, align weights + refit",
                    "merge_experts",
                    {"num_experts": n, "grouping": "router", "align": "weights", "refit": "down_proj"},
                    group,
                ),
            ]
        out.append(
            Variant(
                f"kmeans k={n} -> MoE top-{min(top_k, n)} (closed form)",
                "kmeans_multi_dense",
                {"num_clusters": n, "output": "moe", "moe_top_k": min(top_k, n)},
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
    fractions=FRACTIONS,
    num_samples: int = 128,
) -> str:
    started = time.time()
    testbed = build_testbed(preset, cache_dir=cache_dir)
    moe_config = json.loads((testbed.moe / "config.json").read_text())
    num_experts = moe_config.get("n_routed_experts") or moe_config.get("num_local_experts") or moe_config["num_experts"]
    top_k = moe_config["num_experts_per_tok"]
    seq_len = min(256, moe_config.get("max_position_embeddings", 256))
    calibration = {
        "num_samples": num_samples,
        "seq_len": seq_len,
        "batch_size": 8,
        "max_token_samples": 4096,  # the tokens whose expert outputs group experts
        "record_router_inputs": True,
    }
    documents = load_eval_documents(testbed.test_dir)
    domains = sorted({doc.source for doc in documents})
    work = Path(work_dir or tempfile.mkdtemp(prefix="moe2dense-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # a score that needs the experts' outputs: the pass records them for every score
        full = Variant(
            "calibration", "prune_experts", {"num_experts": num_experts, "score": "usage_diversity", **NO_REFIT}
        )
        stats = calibrate_once(full, testbed, work, calibration)
        moe = score(testbed.moe, documents, seq_len, max_tokens, "MoE")
        rows = [(f"MoE ({num_experts} experts, top-{top_k})", "reference", moe)]
        if testbed.ancestor is not None:
            rows.append(("ancestor (dense)", "reference", score(testbed.ancestor, documents, seq_len, max_tokens, "a")))
        for variant in variants(num_experts, top_k, refit, fractions):
            if only and only not in variant.label:
                continue
            out = build_variant(variant, testbed.moe, testbed.calib_dir, work / "model", stats, calibration)
            rows.append((variant.label, variant.group, score(out, documents, seq_len, max_tokens, variant.label)))
            print(f"  {variant.label}: ppl {rows[-1][2].perplexity:.2f}", file=sys.stderr)
        table = format_table(rows, moe.perplexity, domains)
        tokens = ", ".join(f"{d} {moe.per_source[d]['tokens']}" for d in domains)
        return f"{table}\n\n{preset}: {time.time() - started:.0f} s, scored tokens per test domain: {tokens}"
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def format_table(rows: list[tuple], reference: float, domains: list[str]) -> str:
    """One row per model: perplexity overall and per domain, then the ratio to the MoE's (last)."""
    header = ["model", "group", "ppl", *domains, "ratio to MoE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group, r in rows:
        per = [f"{r.per_source[d]['perplexity']:.3f}" for d in domains]
        cells = [label, group, f"{r.perplexity:.3f}", *per, f"{r.perplexity / reference:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="example", choices=sorted(PRESETS))
    parser.add_argument("--max-tokens", type=int, default=20000, help="scored tokens per test domain")
    parser.add_argument(
        "--fractions",
        default=",".join(f"{f:g}" for f in FRACTIONS),
        help="comma-separated fractions of the experts the smaller MoEs keep",
    )
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--no-refit", action="store_true", help="leave out the re-fitted variants")
    parser.add_argument("--only", default=None, help="only the variants whose label contains this text")
    parser.add_argument("--work-dir", default=None, help="keep built models here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    fractions = [float(f) for f in args.fractions.split(",")]
    print(
        run(
            args.preset,
            args.max_tokens,
            not args.no_refit,
            args.work_dir,
            args.only,
            fractions=fractions,
            num_samples=args.num_samples,
        )
    )


if __name__ == "__main__":
    main()
