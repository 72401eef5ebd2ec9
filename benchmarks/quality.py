# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Quality benchmark: every method against the MoE, its ancestor and its dense twin.

On the trained testbed (benchmarks/testbed.py: a Mistral ancestor upcycled into an
8-expert top-2 Mixtral and trained further; a dense twin trained on the same
tokens), one calibration pass on the calib split is shared by every method
(`--stats` reuse), each method's dense model is built with the library, and all
models are scored on the held-out test split, per domain and overall.

    python benchmarks/quality.py --preset example            # the README's first command
    python benchmarks/quality.py --preset benchmark --write-docs   # docs/results/benchmarks.md + plot
    python benchmarks/quality.py --smoke                     # seconds; run by the tests
    python benchmarks/quality.py --preset scratch            # Qwen3-MoE trained from scratch
    python benchmarks/quality.py --preset scratch-hard --fit-only   # the refit: fit rows and their starts

`refit: fit` rows (the gradient fit of the whole dense MLP, calibration/refit/) also
print the fit's held-out error per layer before (least-squares start) and after, and its
seconds per layer.

The `scratch` presets (docs/results/testbeds.md) have no ancestor (its row is left out) and a
dense twin of the MoE's active size; kmeans' `output: moe` rebuild is Mixtral-only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergekit.options import MergeOptions  # noqa: E402

from benchmarks.testbed import PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.build import STATS_FILE, WEIGHTS_FILE, build_dense  # noqa: E402
from mergekit_moe2dense.config import Moe2DenseConfig  # noqa: E402
from mergekit_moe2dense.methods import METHODS  # noqa: E402
from mergekit_moe2dense.perplexity import EvalResult, evaluate_perplexity, load_eval_documents  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"
# Variants whose per-layer expert weights are plotted (those present in a run).
PLOTTED = (
    "router_weighted mean_logit",
    "router_weighted selection_frequency",
    "top_k_tempered T=0.1 k=1",
    "top_k_tempered T=0.5 k=2",
    "single_expert (most selected)",
)


@dataclass
class Variant:
    label: str
    method: str
    parameters: dict = field(default_factory=dict)
    group: str = "method"


FIT_BASES = ("max_contribution", "concat m={top_k}", "router_weighted mean_logit", "expert_uniform")


def fit_variants(num_experts: int, top_k: int, fit: dict) -> list[Variant]:
    """`refit: fit` on the closed-form rows it starts from (`fit`: its fit_* parameters)."""
    params = {"refit": "fit", **fit}
    return [
        Variant("max_contribution (refit: fit)", "max_contribution", params, "gradient fit"),
        Variant(f"concat m={top_k} (refit: fit)", "concat", {"num_experts": top_k, **params}, f"{top_k}x width, fit"),
        Variant("router_weighted mean_logit (refit: fit)", "router_weighted", params, "gradient fit"),
        Variant("expert_uniform (refit: fit)", "expert_uniform", params, "gradient fit"),
    ]


def variants(
    num_experts: int,
    top_k: int,
    grid: bool,
    fit: dict | None = None,
    fit_only: bool = False,
    fit_methods: tuple[str, ...] | None = None,
) -> list[Variant]:
    """Everything the table compares; methods added later appear when registered."""
    out = [Variant(f"expert {e}", "single_expert", {"expert": e}, "single expert") for e in range(num_experts)]
    out += [
        Variant("expert_uniform", "expert_uniform", group="baseline"),
        Variant("single_expert (most selected)", "single_expert", group="baseline"),
    ]
    out += [
        Variant(f"router_weighted {a}", "router_weighted", {"aggregate": a})
        for a in ("mean_logit", "mean_prob", "median_prob", "selection_frequency")
    ]
    temperatures = (0.1, 0.25, 0.5, 1.0, 2.0) if grid else (0.5,)
    ks = sorted({1, top_k, min(4, num_experts)}) if grid else (top_k,)
    out += [
        Variant(f"top_k_tempered T={t} k={k}", "top_k_tempered", {"temperature": t, "top_k": k})
        for t in temperatures
        for k in ks
    ]
    if grid:
        out.append(
            Variant(
                f"top_k_tempered T=0.5 k={top_k} median",
                "top_k_tempered",
                {"temperature": 0.5, "top_k": top_k, "aggregate": "median"},
            )
        )
    # Activation-aware methods (single-expert width, then the MoE's active width m = top-k).
    out += [
        Variant("max_contribution (refit: none)", "max_contribution", {"refit": "none"}, "activation-aware"),
        Variant("max_contribution (refit: scale)", "max_contribution", {"refit": "scale"}, "activation-aware"),
        Variant("max_contribution (refit: down_proj)", "max_contribution", {"refit": "down_proj"}, "activation-aware"),
        Variant(
            "concat m=1 (refit: down_proj)", "concat", {"num_experts": 1, "refit": "down_proj"}, "activation-aware"
        ),
        Variant(f"concat m={top_k}", "concat", {"num_experts": top_k}, f"{top_k}x width"),
        Variant(
            f"concat m={top_k} (refit: down_proj)",
            "concat",
            {"num_experts": top_k, "refit": "down_proj"},
            f"{top_k}x width",
        ),
        Variant(
            f"concat m={num_experts} (all, fixed mean gates)",
            "concat",
            {"num_experts": num_experts},
            f"{num_experts}x width",
        ),
        Variant(
            "router_weighted mean_logit (refit: down_proj)",
            "router_weighted",
            {"refit": "down_proj"},
            "activation-aware",
        ),
        Variant("expert_uniform (refit: down_proj)", "expert_uniform", {"refit": "down_proj"}, "activation-aware"),
    ]
    if fit_only:  # the closed-form starts of the fit rows, and the fixed-gate concat of all experts
        starts = {b.format(top_k=top_k) + " (refit: down_proj)" for b in FIT_BASES}
        out = [v for v in out if v.label in starts or v.label.startswith(f"concat m={num_experts} ")]
    fits = fit_variants(num_experts, top_k, fit or {})
    if fit_methods:  # only these methods' fit rows (and, with fit_only, their starts)
        fits = [v for v in fits if v.method in fit_methods]
        if fit_only:
            out = [v for v in out if v.method in fit_methods or v.label.startswith(f"concat m={num_experts} ")]
    return [v for v in out + fits if v.method in METHODS]


class FitLog(logging.Handler):
    """Collects the per-layer records `refit: fit` logs (outputs/dense.py): layer ->
    (held-out error of the least-squares start, of the fit, seconds)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.layers: dict[int, tuple[float, float, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "(refit: fit)" in str(record.msg):
            index, start, end, seconds = record.args
            self.layers[index] = (start, end, seconds)


def format_fit_table(fits: dict[str, dict[int, tuple[float, float, float]]]) -> str:
    lines = [
        "| model | layer | held-out error, least-squares start | held-out error, fit | seconds |",
        "|---|---|---|---|---|",
    ]
    for label, layers in fits.items():
        for index, (start, end, seconds) in sorted(layers.items()):
            lines.append(f"| {label} | {index} | {start:.4f} | {end:.4f} | {seconds:.1f} |")
    return "\n".join(lines)


def kmeans_rows(
    testbed, calib, stats, calibration, work, documents, seq_len, max_tokens, top_k, rebuild_moe
) -> list[tuple]:
    """k complementary dense models per k (each scored per domain, plus the best-per-domain
    oracle), and the k-expert MoE rebuilt from them."""
    if "kmeans_multi_dense" not in METHODS:
        return []
    rows = []
    for k in (2, 4):
        out = build_variant(
            Variant("", "kmeans_multi_dense", {"num_clusters": k}),
            testbed.moe,
            calib,
            work / f"kmeans{k}",
            stats,
            calibration,
        )
        results = []
        for j in range(k):
            share = json.loads((out / f"cluster_{j}" / WEIGHTS_FILE).read_text())["token_share"]
            label = f"kmeans k={k} cluster {j} ({share:.0%} of tokens)"
            results.append(score(out / f"cluster_{j}", documents, seq_len, max_tokens, label))
            rows.append((label, "kmeans", results[-1]))
        rows.append((f"kmeans k={k} best cluster per domain (oracle)", "kmeans", oracle(results)))
        for router in ("closed_form", "fitted") if rebuild_moe else ():
            params = {"num_clusters": k, "output": "moe", "moe_top_k": min(top_k, k), "router": router}
            label = f"kmeans k={k} -> MoE top-{min(top_k, k)} ({router} router)"
            moe = build_variant(
                Variant(label, "kmeans_multi_dense", params),
                testbed.moe,
                calib,
                work / "kmeans-moe",
                stats,
                calibration,
            )
            rows.append((label, "kmeans", score(moe, documents, seq_len, max_tokens, label)))
        print(f"  kmeans k={k}: done", file=sys.stderr)
    return rows


def oracle(results: list[EvalResult]) -> EvalResult:
    """Per domain the best of the cluster models; overall the token-weighted mean NLL."""
    import math

    per_source, nll, tokens = {}, 0.0, 0
    for source in results[0].per_source:
        best = min((r.per_source[source] for r in results), key=lambda p: p["perplexity"])
        per_source[source] = best
        nll += math.log(best["perplexity"]) * best["tokens"]
        tokens += best["tokens"]
    return EvalResult(model="oracle", perplexity=math.exp(nll / tokens), tokens=tokens, per_source=per_source)


def calibrate_once(variant: Variant, testbed, work: Path, calibration: dict) -> Path:
    """One calibration pass (a conversion by `variant`), its statistics kept in `work` for every
    variant to reuse through --stats."""
    first = build_variant(variant, testbed.moe, testbed.calib_dir, work / "calibrated", None, calibration)
    stats = work / "router_stats.safetensors"
    shutil.copy(first / STATS_FILE, stats)
    return stats


def build_variant(variant: Variant, moe: Path, calib: Path, out: Path, stats: Path | None, calibration: dict) -> Path:
    config = Moe2DenseConfig.model_validate(
        {
            "merge_method": variant.method,
            "models": [{"model": str(moe)}],
            "parameters": variant.parameters,
            "calibration": {"dataset": str(calib), **calibration},
            "dtype": "float32",
        }
    )
    build_dense(config, str(out), MergeOptions(quiet=True), stats_path=str(stats) if stats else None, overwrite=True)
    return out


def score(path: Path, documents, seq_len: int, max_tokens: int, label: str) -> EvalResult:
    return evaluate_perplexity(
        str(path), documents, seq_len=seq_len, batch_size=8, max_tokens=max_tokens, progress=False, name=label
    )


def format_table(rows: list[tuple], reference: float, domains: list[str]) -> str:
    header = ["model", "group", "ppl", "ratio to MoE", *domains]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group, result in rows:
        per = [f"{result.per_source[d]['perplexity']:.2f}" for d in domains]
        lines.append(
            f"| {label} | {group} | {result.perplexity:.2f} | {result.perplexity / reference:.3f} | "
            + " | ".join(per)
            + " |"
        )
    return "\n".join(lines)


def plot_weights(weight_files: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {label: json.loads(file.read_text())["layers"] for label, file in weight_files.items()}
    top = max(max(max(row) for row in table) for table in tables.values())
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 2.8), squeeze=False)
    for ax, (label, weights) in zip(axes[0], tables.items()):
        image = ax.imshow(weights, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(weights)))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(
    preset: str,
    cache_dir: str | None,
    grid: bool,
    max_tokens: int,
    write_docs: bool,
    work_dir: str | None,
    fit: dict | None = None,
    fit_only: bool = False,
    fit_methods: tuple[str, ...] | None = None,
) -> str:
    started = time.time()
    testbed = build_testbed(preset, cache_dir=cache_dir)
    moe_config = json.loads((testbed.moe / "config.json").read_text())
    num_experts = moe_config.get("num_local_experts") or moe_config["num_experts"]  # Mixtral / Qwen3-MoE
    top_k = moe_config["num_experts_per_tok"]
    seq_len = min(256, moe_config.get("max_position_embeddings", 256))
    calibration = {
        "num_samples": 128,
        "seq_len": seq_len,
        "batch_size": 8,
        "max_token_samples": 16384,
        "record_router_inputs": True,
    }
    documents = load_eval_documents(testbed.test_dir)
    domains = sorted({doc.source for doc in documents})

    work = Path(work_dir or tempfile.mkdtemp(prefix="moe2dense-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stats = calibrate_once(Variant("calibration", "router_weighted"), testbed, work, calibration)

        rows = []
        for label, path, group in (
            (f"MoE ({num_experts} experts, top-{top_k})", testbed.moe, "reference"),
            ("ancestor (dense)", testbed.ancestor, "reference"),
            ("dense twin", testbed.twin, "reference"),
        ):
            if path is None:  # trained from scratch: no ancestor
                continue
            rows.append((label, group, score(path, documents, seq_len, max_tokens, label)))
        weight_files, fits = {}, {}
        for variant in variants(num_experts, top_k, grid and not fit_only, fit, fit_only, fit_methods):
            log = FitLog()
            logger = logging.getLogger("mergekit_moe2dense.outputs.dense")
            logger.addHandler(log)
            logger.setLevel(logging.INFO)
            try:
                out = build_variant(variant, testbed.moe, testbed.calib_dir, work / "model", stats, calibration)
            finally:
                logger.removeHandler(log)
            if log.layers:
                fits[variant.label] = log.layers
            rows.append((variant.label, variant.group, score(out, documents, seq_len, max_tokens, variant.label)))
            if variant.label in PLOTTED:
                keep = work / f"weights-{len(weight_files)}.json"
                shutil.copy(out / WEIGHTS_FILE, keep)
                weight_files[variant.label] = keep
            print(f"  {variant.label}: ppl {rows[-1][2].perplexity:.2f}", file=sys.stderr)
        if grid and not fit_only:
            rows += kmeans_rows(
                testbed,
                testbed.calib_dir,
                stats,
                calibration,
                work,
                documents,
                seq_len,
                max_tokens,
                top_k,
                moe_config["model_type"] == "mixtral",
            )

        reference = rows[0][2].perplexity
        table = format_table(rows, reference, domains)
        elapsed = time.time() - started
        fit_table = format_fit_table(fits) if fits else ""
        if fit_only:
            return "\n\n".join([table, fit_table, f"{elapsed / 60:.1f} min"])
        best_single = min((r for r in rows if r[1] == "single expert"), key=lambda r: r[2].perplexity)
        summary = summarize(rows, best_single)
        if fit_table:
            summary += "\n\n" + fit_table
        if write_docs:
            DOCS.mkdir(exist_ok=True)
            plot_weights(weight_files, DOCS / f"expert_weights_{preset}.png")
            write_quality_docs(preset, table, summary, testbed.report, elapsed, grid, max_tokens, fit_methods)
        return table + "\n\n" + summary
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def summarize(rows, best_single) -> str:
    methods = [r for r in rows if r[1] in ("method", "activation-aware")]
    uniform = next(r for r in rows if r[0] == "expert_uniform")
    best = min(methods, key=lambda r: r[2].perplexity) if methods else None
    moe = rows[0][2].perplexity
    lines = [
        f"Best single expert: {best_single[0]} (ppl {best_single[2].perplexity:.2f}); plain average: ppl {uniform[2].perplexity:.2f}."
    ]
    if best:
        lines.append(
            f"Best retraining-free dense model at single-expert width: {best[0]}, "
            f"{100 * (best[2].perplexity / moe - 1):+.1f}% perplexity vs the MoE (target: within +20%)."
        )
        beats = best[2].perplexity < min(best_single[2].perplexity, uniform[2].perplexity)
        lines.append(
            f"Best calibrated method: {best[0]} (ppl {best[2].perplexity:.2f}), which "
            + ("beats" if beats else "does NOT beat")
            + " both the best single expert and the plain average."
        )
    return "\n".join(lines)


def describe_testbed(report: dict) -> str:
    p, drift = report["preset"], report.get("drift", {})
    text = (
        f"`{p['name']}` preset of benchmarks/testbed.py ({report['recipe_hash']}): {p['num_layers']} layers, "
        f"hidden {p['hidden_size']}, {p['num_experts']} experts of width {p['intermediate_size']}, "
        f"top-{p['experts_per_token']}, vocabulary {p['vocab_size']}; "
    )
    if p.get("ancestor_steps"):
        text += (
            f"a dense ancestor trained {p['ancestor_steps']} steps, upcycled, then {p['further_steps']} steps "
            f"with the load-balancing loss (the dense twin: the same {p['further_steps']} steps densely)"
        )
    cosine = drift.get("expert_pairwise_cosine")
    if cosine:
        text += "; mean pairwise expert cosine per layer " + ", ".join(f"{c:.3f}" for c in cosine)
    return text


def write_quality_docs(preset, table, summary, report, elapsed, grid, max_tokens, fit_methods=None) -> None:
    """Replace the quality section of docs/results/benchmarks.md, keeping other sections."""
    path = DOCS / "benchmarks.md"
    begin, end = f"<!-- quality:{preset}:begin -->", f"<!-- quality:{preset}:end -->"
    command = f"python benchmarks/quality.py --preset {preset}{' --grid' if grid else ''} --max-tokens {max_tokens}"
    if fit_methods:  # the command that made the table, as written
        command += f" --fit-methods {','.join(fit_methods)}"
    command += " --write-docs"
    section = f"""{begin}
## Quality on the `{preset}` testbed

Command: `{command}` ({elapsed / 60:.1f} min on 2 CPU cores, including the testbed build if not cached).

Testbed: {describe_testbed(report)}. Perplexity on the held-out test split
(documents disjoint from the calibration split), per domain and overall; ratio = ppl / MoE ppl.
Calibration: 128 sequences of the calib split, one pass shared by every method.

{table}

{summary}

Per-layer expert weights of the main methods (colour scale up to the largest weight shown): ![weights](expert_weights_{preset}.png)
{end}"""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="example", choices=sorted(PRESETS))
    parser.add_argument("--smoke", action="store_true", help="the tiny smoke testbed (seconds): same as --preset smoke")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--grid", action="store_true", help="the full temperature x top-k grid")
    parser.add_argument("--max-tokens", type=int, default=20000, help="scored tokens per test domain")
    parser.add_argument(
        "--write-docs", action="store_true", help="update docs/results/benchmarks.md and the weights plot"
    )
    parser.add_argument("--work-dir", default=None, help="keep built models here (default: a temp dir, removed)")
    parser.add_argument(
        "--fit-only", action="store_true", help="only the references, the refit: fit rows and their closed-form starts"
    )
    parser.add_argument(
        "--fit-methods",
        default=None,
        help="comma-separated methods whose refit: fit rows run (default: all four; none: no fit rows)",
    )
    parser.add_argument("--fit-steps", type=int, default=None, help="fit_steps of the refit: fit rows")
    parser.add_argument("--fit-lr", type=float, default=None, help="fit_lr of the refit: fit rows")
    parser.add_argument("--fit-batch-tokens", type=int, default=None, help="fit_batch_tokens of the refit: fit rows")
    args = parser.parse_args(argv)
    fit = {
        key: value
        for key, value in (
            ("fit_steps", args.fit_steps),
            ("fit_lr", args.fit_lr),
            ("fit_batch_tokens", args.fit_batch_tokens),
        )
        if value is not None
    }
    methods = tuple(args.fit_methods.split(",")) if args.fit_methods else None
    if args.smoke:
        args.preset = "smoke"
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    print(
        run(
            args.preset,
            args.cache_dir,
            args.grid,
            args.max_tokens,
            args.write_docs,
            args.work_dir,
            fit,
            args.fit_only,
            methods,
        )
    )


if __name__ == "__main__":
    main()
