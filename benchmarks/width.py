# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Width benchmark: a dense model's quality against its size on a fine-grained MoE.

`concat` keeps m experts per layer, chosen by `score: usage_diversity`, side by side at their
mean gates, with and without `refit: down_proj`; m runs from the MoE's active count (top-k)
to several times it (`--widths`, multiples of top-k). One calibration pass on the testbed's
calib split is shared by every model (`--stats`); every model is scored on the whole held-out
test split, overall and per domain, and counted: its parameters and its MLP parameters (the
tensors under `.mlp.`, router and shared experts included), against the MoE's total and active
counts (the active count holds top-k of each layer's routed experts) and the dense twin's.

    MOE2DENSE_CACHE=/tmp/m2dcache python benchmarks/width.py --preset fine-qwen3 --plot docs/results/width_fine-qwen3.png
    MOE2DENSE_CACHE=/tmp/m2dcache python benchmarks/width.py --preset fine-qwen3 --num-samples 64   # fewer tokens
    python benchmarks/width.py --smoke          # seconds: the fine-qwen3-smoke testbed, few tokens

The calibration is 128-token pieces of the calib split (`--num-samples`, by default 512: all
of a fine preset's); the re-fit of a wide model needs many of them (docs/results/fine_grained.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import Variant, build_variant, calibrate_once, score  # noqa: E402
from benchmarks.testbed import PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.perplexity import EvalResult, load_eval_documents  # noqa: E402

SCORE = "usage_diversity"
WIDTHS = (1, 1.5, 2, 3, 4, 6, 8)  # multiples of top-k: m = 8 ... 64 on a top-8 MoE of 64 experts
SMOKE = {"preset": "fine-qwen3-smoke", "max_tokens": 1000, "num_samples": 8}


@dataclass(frozen=True)
class Params:
    """Parameter counts of a checkpoint (every tensor it stores)."""

    total: int
    mlp: int
    active: int  # total with only top-k of each layer's routed experts
    active_mlp: int


@dataclass(frozen=True)
class Row:
    label: str
    m: int | None  # experts kept per layer (None: the MoE, the twin)
    refit: str | None
    params: Params
    result: EvalResult


def count_params(model: Path, top_k: int | None = None, num_experts: int | None = None) -> Params:
    """Parameters stored in `model`'s safetensors. With `top_k` and `num_experts` (an MoE), the
    routed experts' tensors (names with `.mlp.experts.`) count k/E of their size as active."""
    total = mlp = routed = 0
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                size = math.prod(f.get_slice(name).get_shape())
                total += size
                if ".mlp." in name:
                    mlp += size
                    if ".mlp.experts." in name:
                        routed += size
    idle = 0 if top_k is None else round(routed * (1 - top_k / num_experts))
    return Params(total, mlp, total - idle, mlp - idle)


def widths(multiples, top_k: int, num_experts: int) -> list[int]:
    """The m of each multiple of top-k, at most the MoE's experts, without repeats."""
    return sorted({min(num_experts, max(1, round(w * top_k))) for w in multiples})


def run(
    preset: str,
    multiples=WIDTHS,
    max_tokens: int | None = None,
    num_samples: int = 512,
    work_dir: str | None = None,
    cache_dir: str | None = None,
    plot: str | None = None,
) -> tuple[str, list[Row]]:
    """The markdown table (and a summary) and its rows."""
    started = time.time()
    testbed = build_testbed(preset, cache_dir=cache_dir)
    moe_config = json.loads((testbed.moe / "config.json").read_text())
    num_experts = moe_config.get("n_routed_experts") or moe_config.get("num_local_experts") or moe_config["num_experts"]
    top_k = moe_config["num_experts_per_tok"]
    seq_len = min(128, moe_config.get("max_position_embeddings", 128))
    calibration = {"num_samples": num_samples, "seq_len": seq_len, "batch_size": 8, "max_token_samples": 2048}
    documents = load_eval_documents(testbed.test_dir)
    domains = sorted({doc.source for doc in documents})
    work = Path(work_dir or tempfile.mkdtemp(prefix="moe2dense-width-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stats = calibrate_once(
            Variant("calibration", "concat", {"num_experts": top_k, "score": SCORE, "refit": "none"}),
            testbed,
            work,
            calibration,
        )
        rows = [
            Row(
                f"MoE ({num_experts} experts, top-{top_k})",
                None,
                None,
                count_params(testbed.moe, top_k, num_experts),
                score(testbed.moe, documents, seq_len, max_tokens, "MoE"),
            ),
            Row(
                "dense twin",
                None,
                None,
                count_params(testbed.twin),
                score(testbed.twin, documents, seq_len, max_tokens, "twin"),
            ),
        ]
        for m in widths(multiples, top_k, num_experts):
            for refit in ("none", "down_proj"):
                label = f"concat m={m}" + (", `refit: down_proj`" if refit != "none" else "")
                variant = Variant(label, "concat", {"num_experts": m, "score": SCORE, "refit": refit})
                out = build_variant(variant, testbed.moe, testbed.calib_dir, work / "model", stats, calibration)
                rows.append(Row(label, m, refit, count_params(out), score(out, documents, seq_len, max_tokens, label)))
                print(f"  {label}: ppl {rows[-1].result.perplexity:.3f}", file=sys.stderr)
        if plot:
            plot_width(rows, Path(plot), preset)
        elapsed = time.time() - started
        text = "\n\n".join(
            [
                format_table(rows, domains),
                summarize(rows),
                f"{preset}: {elapsed / 60:.1f} min, {rows[0].result.tokens} scored tokens",
            ]
        )
        return text, rows
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def format_table(rows: list[Row], domains: list[str]) -> str:
    moe, twin = rows[0].result.perplexity, rows[1].result.perplexity
    header = [
        "model",
        "params",
        "active params",
        "MLP params",
        "active MLP",
        "ppl",
        *domains,
        "ratio to MoE",
        "ratio to twin",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        p, r = row.params, row.result
        cells = [
            row.label,
            f"{p.total:,}",
            f"{p.active:,}",
            f"{p.mlp:,}",
            f"{p.active_mlp:,}",
            f"{r.perplexity:.3f}",
            *(f"{r.per_source[d]['perplexity']:.3f}" for d in domains),
            f"{r.perplexity / moe:.3f}",
            f"{r.perplexity / twin:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(rows: list[Row]) -> str:
    """The smallest m at which each series reaches the twin and 1.5x the MoE."""
    moe, twin = rows[0].result.perplexity, rows[1].result.perplexity
    lines = []
    for refit in ("none", "down_proj"):
        series = [r for r in rows if r.refit == refit]
        best = min(series, key=lambda r: r.result.perplexity)
        reached = []
        for name, bound in (("the twin", twin), ("1.5x the MoE", 1.5 * moe)):
            first = next((r.m for r in series if r.result.perplexity <= bound), None)
            reached.append(f"{name} from m={first}" if first else f"{name} at no m")
        lines.append(
            f"refit {refit}: best m={best.m} ({best.result.perplexity / moe:.2f}x the MoE); reaches "
            + ", ".join(reached)
        )
    return "\n".join(lines)


def plot_width(rows: list[Row], path: Path, preset: str) -> None:
    """Perplexity ratio to the MoE against parameters; the MoE at its active and total counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    moe, twin = rows[0], rows[1]
    ref = moe.result.perplexity
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for refit, style, offset in (("none", "o--", (4, 5)), ("down_proj", "s-", (4, -11))):
        series = [r for r in rows if r.refit == refit]
        x = [r.params.total for r in series]
        y = [r.result.perplexity / ref for r in series]
        ax.plot(x, y, style, label=f"concat, {SCORE}" + (", refit: down_proj" if refit != "none" else ""))
        for r, xi, yi in zip(series, x, y):
            ax.annotate(f"m={r.m}", (xi, yi), textcoords="offset points", xytext=offset, fontsize=7)
    ax.plot([moe.params.active, moe.params.total], [1.0, 1.0], "k*:", markersize=11, label="MoE (active, total)")
    ax.plot(
        [twin.params.total], [twin.result.perplexity / ref], "D", color="tab:green", markersize=8, label="dense twin"
    )
    ax.axhline(1.5, color="grey", linewidth=0.8, linestyle="-.", label="1.5x the MoE")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [t for t in (1, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16) if t <= 1.2 * max(r.result.perplexity / ref for r in rows)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    thousands = FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k")
    ax.xaxis.set_major_formatter(thousands)
    ax.xaxis.set_minor_formatter(thousands)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("parameters (stored)")
    ax.set_ylabel("perplexity / MoE perplexity (test split)")
    ax.set_title(f"{preset}: dense width against quality", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fine-qwen3", choices=sorted(PRESETS))
    parser.add_argument(
        "--smoke", action="store_true", help="the fine-qwen3-smoke testbed, 8 calibration samples, 1000 tokens a domain"
    )
    parser.add_argument(
        "--widths", default=",".join(f"{w:g}" for w in WIDTHS), help="comma-separated multiples of top-k (m = w x k)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="scored tokens per test domain (default: all)")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=512,
        help="calibration sequences of up to 128 tokens (512: all of a fine preset's calib split)",
    )
    parser.add_argument("--plot", default=None, help="write the plot (PNG) here")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="keep built models here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.max_tokens, args.num_samples = SMOKE["preset"], SMOKE["max_tokens"], SMOKE["num_samples"]
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    multiples = [float(w) for w in args.widths.split(",")]
    text, _ = run(args.preset, multiples, args.max_tokens, args.num_samples, args.work_dir, args.cache_dir, args.plot)
    print(text)


if __name__ == "__main__":
    main()
