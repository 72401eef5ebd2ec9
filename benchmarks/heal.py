# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Heal benchmark: how much of the MoE a short retraining recovers, and at what speed.

On a trained testbed (benchmarks/testbed.py), rows of held-out perplexity (the test split,
`evaluate.py`), as ratios to the MoE's:

1. the best retraining-free dense model of the dense twin's width (`router_weighted` +
   `refit: down_proj` on the upcycled presets, `concat` of the top-k experts + `refit: down_proj`
   on the from-scratch ones);
2. the same with `refit: fit` (the per-layer gradient fit), the heal's student
   by default (`--heal-from fit`; `down_proj` heals the closed-form model);
3. `heal` of that student at fractions of the MoE's own training tokens (forward KL, on the
   fly, mixed with the LM loss by `--lm-weights`; the training text is the testbed's train
   split, rebuilt from its recipe), a row per `--hidden-weights` weight of the hidden-state loss;
4. `collapse` of the MoE at one fraction, LM loss (and KD) plus the expert penalty (not with
   `--heal-only`);
5. the MoE and the dense twin trained on 100% of the tokens.

The learning rate and the LM-loss weight are chosen on the calib split (a small sweep at the
collapse fraction, for each hidden-state weight), the table is on the test split. Then the
throughput of the heal's `Trainer` (teacher cache, and on the fly) against a plain transformers
training loop (AdamW, `model(ids, labels=ids)`) on the same student, batch and device, measured
alternately in one run (not with `--heal-only`).

    python benchmarks/heal.py --preset scratch [--write-docs]
    python benchmarks/heal.py --preset example [--write-docs]
    python benchmarks/heal.py --smoke            # seconds: the mechanics only
    python benchmarks/heal.py --preset fine-qwen3 --fractions 0.05 --hidden-weights 0,0.1,1 --heal-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergekit.options import MergeOptions  # noqa: E402

from benchmarks.testbed import DOMAINS, PRESETS, build_testbed, collect_documents, join, split_documents  # noqa: E402
from mergekit_moe2dense.build import build_dense  # noqa: E402
from mergekit_moe2dense.config import Moe2DenseConfig  # noqa: E402
from mergekit_moe2dense.data import load_documents  # noqa: E402
from mergekit_moe2dense.perplexity import evaluate_perplexity, load_eval_documents  # noqa: E402
from mergekit_moe2dense.training import CollapseSettings, HealSettings, TrainSettings, collapse, heal  # noqa: E402
from mergekit_moe2dense.training.inputs import training_sequences  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def moe_training_tokens(testbed) -> int:
    """Tokens the MoE trained on (its own phase): the report's field, else steps x batch x seq_len."""
    report = testbed.report
    for key in ("moe_train_tokens", "train_tokens", "training_tokens"):
        value = report.get(key)
        if isinstance(value, dict):
            value = value.get("moe")
        if isinstance(value, int):
            return value
    preset = report["preset"]
    return preset["further_steps"] * preset["batch_size"] * preset["seq_len"]


def write_train_split(preset_name: str, out: Path) -> Path:
    """The testbed's train split as text files (the recipe is deterministic)."""
    splits = split_documents(collect_documents(), PRESETS[preset_name])
    out.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        (out / f"{domain}.txt").write_text(join(splits["train"][domain]), encoding="utf-8")
    return out


def convert(
    moe: Path, calib: Path, out: Path, method: str, parameters: dict, seq_len: int, num_samples: int = 128
) -> Path:
    config = Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(moe)}],
            "parameters": parameters,
            "calibration": {"dataset": str(calib), "num_samples": num_samples, "seq_len": seq_len, "batch_size": 8},
            "dtype": "float32",
        }
    )
    build_dense(config, str(out), MergeOptions(quiet=True), overwrite=True)
    return out


def score(model, documents, seq_len: int, max_tokens: int | None):
    return evaluate_perplexity(
        str(model), documents, seq_len=seq_len, batch_size=8, max_tokens=max_tokens, progress=False
    )


def plain_loop_throughput(student: Path, sequences: torch.Tensor, batch: int, steps: int, lr: float) -> float:
    """Tokens/s of the textbook loop: AdamW, LM loss, clip, step; after one warmup step."""
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        ids = sequences[(step * batch) % len(sequences) :][:batch]
        if len(ids) < batch:
            ids = sequences[:batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch * sequences.shape[1] / (time.perf_counter() - start)


def run(args) -> str:
    started = time.time()
    testbed = build_testbed(args.preset, cache_dir=args.cache_dir)
    preset = testbed.report["preset"]
    seq_len, batch = preset["seq_len"], args.batch_size or preset["batch_size"]
    scratch = preset.get("family", "mixtral") != "mixtral"
    total_tokens = moe_training_tokens(testbed)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="moe2dense-heal-"))
    work.mkdir(parents=True, exist_ok=True)
    train_dir = write_train_split(args.preset, work / "train")
    # scored as `eval` scores them (each .txt file one stream); training keeps its documents
    test_docs, calib_docs = load_eval_documents(testbed.test_dir), load_eval_documents(testbed.calib_dir)
    domains = sorted({doc.source for doc in test_docs})
    limit = args.eval_max_tokens
    rows: list[tuple[str, int | None, typing.Any]] = []
    notes: list[str] = []

    top_k = json.loads((testbed.moe / "config.json").read_text())["num_experts_per_tok"]
    if scratch:
        label, method, params = f"concat m={top_k} + refit: down_proj", "concat", {"num_experts": top_k}
        if args.score:
            label, params = label.replace(" +", f" by {args.score} +"), {**params, "score": args.score}
    else:
        label, method, params = "router_weighted + refit: down_proj", "router_weighted", {}
    student = convert(
        testbed.moe, testbed.calib_dir, work / "student", method, {**params, "refit": "down_proj"}, seq_len
    )
    if args.throughput_only:
        return measure_throughput(
            student, testbed.moe, train_dir, work, seq_len, batch, args.lrs[0], args.throughput_steps
        )["text"]
    moe_ppl = score(testbed.moe, test_docs, seq_len, limit)
    rows.append(("MoE (teacher)", total_tokens, moe_ppl))
    rows.append((f"{label} (retraining-free)", 0, score(student, test_docs, seq_len, limit)))
    fit = convert(testbed.moe, testbed.calib_dir, work / "fit", method, {**params, "refit": "fit"}, seq_len)
    rows.append((f"{label.replace('down_proj', 'fit')} (retraining-free)", 0, score(fit, test_docs, seq_len, limit)))
    # the heal starts from the best retraining-free model of the twin's width (fit, then heal)
    start = fit if args.heal_from == "fit" else student
    start_row = rows[-1] if args.heal_from == "fit" else rows[1]

    def settings(fraction: float, lr: float, **extra) -> TrainSettings:
        tokens = max(1, round(fraction * total_tokens))
        return TrainSettings(max_tokens=tokens, seq_len=seq_len, batch_size=batch, lr=lr, logging_steps=5,
                             seed=args.seed, **extra)  # fmt: skip

    def healing(fraction: float, config: tuple[float, float, float]) -> HealSettings:
        lr, lm_weight, hidden_weight = config
        return HealSettings(student=start, teacher=testbed.moe, data=train_dir, hidden_weight=hidden_weight,
                            training=settings(fraction, lr, lm_weight=lm_weight))  # fmt: skip

    # per hidden-state weight, the learning rate and LM-loss weight best on the calib split at
    # the collapse fraction (the goal's 5%); the test split scores each loss at its own best
    grid = [(lr, w, h) for lr in args.lrs for w in args.lm_weights for h in args.hidden_weights]
    sweep = {}
    if len(grid) > 1:
        for config in grid:
            out = heal(healing(args.collapse_fraction, config), str(work / "sweep-{}-{}-{}".format(*config)),
                       overwrite=True, progress=False)  # fmt: skip
            sweep[config] = score(out.out_path, calib_docs, seq_len, limit).perplexity
        notes.append("sweep (calib split ppl at " + f"{args.collapse_fraction:.0%}, lr / lm-weight / hidden-weight): "
                     + ", ".join(f"{lr:g} / {w:g} / {h:g}: {ppl:.3f}" for (lr, w, h), ppl in sweep.items()))  # fmt: skip
    configs = [min((c for c in grid if c[2] == h), key=lambda c: sweep.get(c, 0.0)) for h in args.hidden_weights]
    best = min(configs, key=lambda c: sweep.get(c, 0.0))
    lr = best[0]
    curve = [(0, start_row[2].perplexity)]
    for config in configs:
        for fraction in sorted(args.fractions):
            result = heal(healing(fraction, config), str(work / f"heal-{fraction}-{config[2]}"), overwrite=True,
                          progress=False)  # fmt: skip
            ppl = score(result.out_path, test_docs, seq_len, limit)
            rows.append((f"heal {fraction:.0%} of refit: {args.heal_from} ({loss_label(config)}, lr {config[0]:g}, "
                         f"{result.steps} steps)", result.tokens, ppl))  # fmt: skip
            if config == best:
                curve.append((result.tokens, ppl.perplexity))
    for variant, extra in (("LM", {"lm_weight": 1.0}), ("KD", {"lm_weight": 0.0})) if not args.heal_only else ():
        collapsing = CollapseSettings(moe=testbed.moe, data=train_dir, penalty_max=args.penalty_max,
                                      training=settings(args.collapse_fraction, lr, **extra))  # fmt: skip
        result = collapse(collapsing, str(work / f"collapse-{variant}"), overwrite=True, progress=False)
        ppl = score(result.out_path, test_docs, seq_len, limit)
        rows.append((f"collapse {args.collapse_fraction:.0%} ({variant}, then expert_uniform; single-expert width)",
                     result.tokens, ppl))  # fmt: skip
        notes.append(f"collapse {variant}: expert spread {result.record['expert_spread_before']:.3g} -> "
                     f"{result.record['expert_spread_after']:.3g}")  # fmt: skip
    rows.append(("dense twin (trained on 100%)", total_tokens, score(testbed.twin, test_docs, seq_len, limit)))

    throughput = None
    if not args.heal_only:
        throughput = measure_throughput(start, testbed.moe, train_dir, work, seq_len, batch, lr, args.throughput_steps)
        notes.append(f"throughput ({args.throughput_steps} steps of {batch} x {seq_len} tokens, CPU, best of 2 "
                     f"alternating rounds):\n  {throughput['text']}")  # fmt: skip
    table = format_table(rows, moe_ppl.perplexity, domains, total_tokens)
    elapsed = time.time() - started
    text = f"""### `{args.preset}` ({"from scratch" if scratch else "upcycled"}; MoE trained on {total_tokens} tokens)

{table}

{chr(10).join("- " + n for n in notes)}
- benchmark time: {elapsed:.0f} s
"""
    if args.plot:
        plot(curve, moe_ppl.perplexity, rows[-1][2].perplexity, rows, Path(args.plot), args.preset, total_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [(r[0], r[1], r[2].perplexity if r[2] else None) for r in rows],
                                               "curve": curve, "throughput": throughput, "lr": lr,
                                               "sweep": [[*c, ppl] for c, ppl in sweep.items()],
                                               "configs": configs, "seed": args.seed}, indent=2))  # fmt: skip
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return text


def loss_label(config: tuple[float, float, float]) -> str:
    """A heal's loss as a row names it: `KD`, `KD + 0.5 LM`, `KD + 0.1 hidden`."""
    _, lm_weight, hidden_weight = config
    label = "KD" if lm_weight == 0 else f"KD + {lm_weight:g} LM"
    return label + (f" + {hidden_weight:g} hidden" if hidden_weight else "")


def measure_throughput(student, moe, train_dir, work, seq_len, batch, lr, steps) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    sequences = training_sequences(load_documents(train_dir), tokenizer, seq_len=seq_len, count=steps * batch,
                                   seed=0, label="train")  # fmt: skip
    tokens = steps * batch * seq_len
    runs = {  # name: (teacher cache, lm_weight)
        "heal --lm-weight 1 (the Trainer, LM loss only)": (None, 1.0),
        "heal, teacher cache": (work / "cache", 0.0),
        "heal, teacher on the fly": (None, 0.0),
    }
    best = {"plain transformers loop": 0.0, **dict.fromkeys(runs, 0.0)}
    for round_ in range(2):
        best["plain transformers loop"] = max(
            best["plain transformers loop"], plain_loop_throughput(student, sequences, batch, steps, lr)
        )
        for name, (cache, lm_weight) in runs.items():
            settings = TrainSettings(
                max_tokens=tokens, seq_len=seq_len, batch_size=batch, lr=lr, logging_steps=5, lm_weight=lm_weight
            )
            healing = HealSettings(student=student, teacher=moe, data=train_dir, training=settings,
                                   teacher_cache=cache)  # fmt: skip
            result = heal(healing, str(work / f"speed-{round_}"), overwrite=True, progress=False)
            rates = result.record["tokens_per_s_logged"]
            best[name] = max(best[name], sum(rates) / len(rates))
    plain = best["plain transformers loop"]
    text = "; ".join(f"{name} {value:.0f} tokens/s ({value / plain:.2f}x)" for name, value in best.items())
    return {"tokens_per_s": best, "text": text}


def format_table(rows, reference: float, domains, total_tokens: int) -> str:
    header = ["model", "training tokens", "ppl", "ratio to MoE", *domains]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, tokens, result in rows:
        if result is None:
            lines.append(f"| {label} | - | - | - |" + " - |" * len(domains))
            continue
        share = "" if tokens in (None, 0) else f" ({tokens / total_tokens:.1%})"
        per = [f"{result.per_source[d]['perplexity']:.2f}" for d in domains]
        lines.append(f"| {label} | {tokens or 0}{share} | {result.perplexity:.3f} | {result.perplexity / reference:.3f} | "
                     + " | ".join(per) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(curve, moe: float, twin: float, rows, path: Path, preset: str, total_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [max(t, 1) / total_tokens * 100 for t, _ in curve]
    ax.plot(xs[1:], [p for _, p in curve[1:]], "o-", label="heal (KD) of the retraining-free student")
    ax.axhline(curve[0][1], color="gray", ls=":", label="student before heal")
    ax.axhline(moe, color="k", ls="--", label="MoE")
    ax.axhline(1.1 * moe, color="k", ls=":", lw=0.8, label="MoE + 10% (goal)")
    ax.axhline(twin, color="tab:green", ls="--", label="dense twin, 100% tokens")
    for label, tokens, result in rows:
        if result is not None and label.startswith("collapse"):
            ax.plot(
                [tokens / total_tokens * 100],
                [result.perplexity],
                "s",
                label=label.split(" (")[0] + " " + label.split("(")[1].split(",")[0],
            )
    ax.set_xscale("log")
    ax.set_xlabel("heal tokens, % of the MoE's training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"testbed `{preset}`")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="scratch", choices=sorted(PRESETS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument(
        "--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.02, 0.05, 0.1, 0.2]
    )
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--lm-weights", type=lambda s: [float(x) for x in s.split(",")], default=[0.0],
                        help="LM-loss weights to sweep with the learning rates (0: pure KD)")  # fmt: skip
    parser.add_argument("--hidden-weights", type=lambda s: [float(x) for x in s.split(",")], default=[0.0],
                        help="hidden-state loss weights to sweep too (heal --hidden-weight); a row for each")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the heals' seed (data order)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per heal step (default: the testbed's): the same tokens in more, smaller steps")  # fmt: skip
    parser.add_argument("--heal-from", choices=["fit", "down_proj"], default="fit",
                        help="the heal's student: the refit: fit conversion (default) or the closed-form one")  # fmt: skip
    parser.add_argument("--score", default=None, help="concat's selection score on the from-scratch presets")
    parser.add_argument("--collapse-fraction", type=float, default=0.05)
    parser.add_argument("--penalty-max", type=float, default=1e4)
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--eval-max-tokens", type=int, default=None)
    parser.add_argument("--plot", default=None, help="write the perplexity-vs-tokens plot (PNG) here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput comparison")
    parser.add_argument("--heal-only", action="store_true", help="no collapse rows and no throughput comparison")
    parser.add_argument("--smoke", action="store_true", help="scratch-smoke, two fractions, one lr, few steps")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    if args.smoke:
        args.preset, args.fractions, args.lrs, args.throughput_steps = "scratch-smoke", [0.01, 0.05], [1e-3], 11
        args.eval_max_tokens = 2000
        args.penalty_max = max(args.penalty_max, 1e5)  # its few collapse steps need the stronger pull to be exact
    print(run(args))


if __name__ == "__main__":
    main()
