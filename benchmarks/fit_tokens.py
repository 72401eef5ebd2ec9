# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Fit-tokens benchmark: how much calibration text the re-fits need on a fine-grained MoE.

`concat` of the top-k experts by `score: usage_diversity` with `refit: fit` (the dense model of
the MoE's active width), its per-layer fit calibrated on more and more text: the testbed's calib
split (128 pieces of 128 tokens, then all of them), then the testbed's train split (the text the
MoE trained on, in its own mix), then that text with each domain capped at `BALANCE_CHARS`
characters (a mix close to the test split's), with the fit's default steps and four times as
many (`--variants dense`). Then half the experts by `prune_experts` (`score` reap and
diversity), without and with `refit: down_proj`, calibrated on 128 pieces of the calib split
and on 2,048 of the train text (`--variants prune`). Every model is scored on the whole
held-out test split, overall and per domain, as a ratio to the MoE's perplexity, beside the
dense twin.

    MOE2DENSE_CACHE=/tmp/m2dcache python benchmarks/fit_tokens.py --preset fine-qwen3
    MOE2DENSE_CACHE=/tmp/m2dcache python benchmarks/fit_tokens.py --preset fine-glm-all-text
    python benchmarks/fit_tokens.py --smoke     # seconds: the fine-qwen3-smoke testbed, tiny variants
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.heal import convert, score, write_train_split  # noqa: E402
from benchmarks.testbed import DOMAINS, PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.perplexity import load_eval_documents  # noqa: E402

SCORE = "usage_diversity"
BALANCE_CHARS = 1_000_000  # per domain: the code domain's 9.7M cut to about the size of the others


@dataclass(frozen=True)
class Variant:
    """One calibration (which text, how many 128-token pieces) and the conversion fitted on it:
    the dense model of the active width (`concat` + `refit: fit` with `fit_steps`), or, with
    `prune_score`, half the experts by `prune_experts` with `refit` (`none` or `down_proj`)."""

    text: str  # "calib", "train" or "balanced"
    num_samples: int
    fit_steps: int = 300  # the dense model's
    prune_score: str | None = None
    refit: str = "none"  # the pruned MoE's

    def label(self, top_k: int) -> str:
        text = {"calib": "calib split", "train": "train text", "balanced": "train text, domains balanced"}[self.text]
        if self.prune_score:
            return f"prune half by {self.prune_score}, refit {self.refit}, on the {text}, {self.num_samples} pieces"
        return f"concat m={top_k}, fit on the {text}, {self.num_samples} pieces, {self.fit_steps} fit steps"

    def conversion(self, top_k: int, num_experts: int) -> tuple[str, dict]:
        if self.prune_score:
            return "prune_experts", {"num_experts": num_experts // 2, "score": self.prune_score, "refit": self.refit}
        return "concat", {"num_experts": top_k, "score": SCORE, "refit": "fit", "fit_steps": self.fit_steps}


DENSE_VARIANTS = (
    Variant("calib", 128, 300),
    Variant("calib", 512, 300),
    Variant("train", 512, 300),
    Variant("train", 2048, 300),
    Variant("train", 2048, 1200),
    Variant("balanced", 2048, 1200),
)
PRUNE_VARIANTS = tuple(
    Variant(text, n, prune_score=score, refit=refit)
    for text, n in (("calib", 128), ("train", 2048))
    for score in ("reap", "diversity")
    for refit in ("none", "down_proj")
)
VARIANTS = {"dense": DENSE_VARIANTS, "prune": PRUNE_VARIANTS, "all": DENSE_VARIANTS + PRUNE_VARIANTS}
SMOKE_VARIANTS = (
    Variant("calib", 8, 20),
    Variant("train", 32, 20),
    Variant("balanced", 32, 40),
    Variant("train", 32, prune_score="reap", refit="down_proj"),
)


def balanced_split(train: Path, out: Path, chars: int) -> Path:
    """The train split with each domain's text cut to its first `chars` characters."""
    out.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        text = (train / f"{domain}.txt").read_text(encoding="utf-8")
        (out / f"{domain}.txt").write_text(text[:chars], encoding="utf-8")
    return out


def run(preset: str, variants, work_dir: str | None = None, cache_dir: str | None = None, balance_chars=BALANCE_CHARS):
    """The report (a markdown table and notes) and the rows as (label, EvalResult)."""
    start = time.time()
    testbed = build_testbed(preset, cache_dir)
    recipe = testbed.report["preset"]
    seq_len, top_k, num_experts = recipe["seq_len"], recipe["experts_per_token"], recipe["num_experts"]
    temporary = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="moe2dense-fit-tokens-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        train = write_train_split(preset, work / "train")
        texts = {
            "calib": testbed.calib_dir,
            "train": train,
            "balanced": balanced_split(train, work / "balanced", balance_chars),
        }
        test_docs = load_eval_documents(testbed.test_dir)
        rows = [
            ("MoE", score(testbed.moe, test_docs, seq_len, None)),
            ("dense twin", score(testbed.twin, test_docs, seq_len, None)),
        ]
        seconds = {}
        for variant in variants:
            began, label = time.time(), variant.label(top_k)
            method, params = variant.conversion(top_k, num_experts)
            out = work / f"{method}-{len(seconds)}"
            convert(testbed.moe, texts[variant.text], out, method, params, seq_len, num_samples=variant.num_samples)
            seconds[label] = time.time() - began
            rows.append((label, score(out, test_docs, seq_len, None)))
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    moe = rows[0][1].perplexity
    domains = sorted(rows[0][1].per_source)
    lines = [
        f"### `{preset}`: the re-fits by calibration text (`concat` m={top_k} by `{SCORE}`, `prune_experts`)",
        "",
        f"| model | ppl | {' | '.join(domains)} | ratio to MoE |",
        "|---|---|" + "---|" * len(domains) + "---|",
    ]
    for label, result in rows:
        cells = [f"{result.per_source[d]['perplexity']:.2f}" for d in domains]
        lines.append(f"| {label} | {result.perplexity:.3f} | {' | '.join(cells)} | {result.perplexity / moe:.3f} |")
    lines += ["", *(f"- {label}: conversion {s:.0f} s" for label, s in seconds.items())]
    lines.append(f"- benchmark time: {time.time() - start:.0f} s")
    return "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fine-qwen3", choices=sorted(PRESETS))
    parser.add_argument(
        "--variants", choices=sorted(VARIANTS), default="all", help="the dense rows, the pruned ones, or both"
    )
    parser.add_argument("--smoke", action="store_true", help="the fine-qwen3-smoke testbed and tiny variants")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="keep built models here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.smoke:
        report, _ = run("fine-qwen3-smoke", SMOKE_VARIANTS, args.work_dir, args.cache_dir, balance_chars=20_000)
    else:
        report, _ = run(args.preset, VARIANTS[args.variants], args.work_dir, args.cache_dir)
    print(report)


if __name__ == "__main__":
    main()
