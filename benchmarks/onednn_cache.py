# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""oneDNN's primitive cache on and off: what a conversion saves, what training would lose.

On the CPU, bf16 matmuls go through oneDNN, which keeps a compiled primitive for every shape it
has multiplied (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default). A conversion and a calibration
turn it off (`memory.bound_onednn_primitive_cache`): their layer loops meet new shapes in every
layer. `heal`, `collapse` and `eval` keep it: they repeat their shapes. This measures both sides
on one generated bf16 checkpoint (scale.py's), each run in its own process, the two settings
alternating for `--rounds` rounds:

- the layer-streamed calibration (scale.py's child): tokens/s and peak RSS;
- a `heal` in bf16 of a dense student (`expert_uniform`) of the same MoE, the teacher on the fly:
  steady-state tokens/s (the mean of its logged rates after the first log, which holds start-up).

    python benchmarks/onednn_cache.py                      # 2 GB, 512 calibration tokens
    python benchmarks/onednn_cache.py --smoke              # seconds: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale import FULL_SHAPE, GB, SMOKE_SHAPE, measure, write_calibration_text  # noqa: E402

VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
# a calibration sets 0 where the variable is unset: the default is given as its value
SETTINGS = {"off (0: a conversion, a calibration)": "0", "1024 (oneDNN's default: heal, eval)": "1024"}
SCALE = Path(__file__).resolve().parent / "scale.py"


def child_student(moe: str, out: str) -> None:
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig

    config = Moe2DenseConfig.model_validate(
        {"merge_method": "expert_uniform", "models": [{"model": moe}], "dtype": "bfloat16"}
    )
    build_dense(config, out, MergeOptions(quiet=True), overwrite=True)


def child_heal(student: str, teacher: str, data: str, out: str, tokens: int, seq_len: int) -> None:
    from mergekit_moe2dense.training import HealSettings, TrainSettings, heal

    training = TrainSettings(max_tokens=tokens, seq_len=seq_len, batch_size=4, dtype="bfloat16", logging_steps=2)
    settings = HealSettings(student=student, teacher=teacher, data=data, training=training)
    result = heal(settings, out, overwrite=True, progress=False)
    rates = result.record["tokens_per_s_logged"]
    if not rates:
        raise SystemExit(f"the heal logged no steady-state rate in {result.steps} steps: raise --heal-tokens")
    print(json.dumps({"tokens_per_s": sum(rates) / len(rates), "steps": result.steps}))


def run(args) -> dict:
    shape = SMOKE_SHAPE if args.smoke else FULL_SHAPE
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="moe2dense-onednn-"))
    workdir.mkdir(parents=True, exist_ok=True)
    moe, student, data = workdir / "moe", workdir / "student", workdir / "calib.txt"
    me = [sys.executable, os.fspath(Path(__file__).resolve())]
    if not (moe / "model.safetensors.index.json").is_file():
        generated = measure([sys.executable, os.fspath(SCALE), "_generate", str(moe), str(args.size_gb * GB),
                             "smoke" if args.smoke else "full"])  # fmt: skip
        print(f"checkpoint: {generated.report['bytes'] / GB:.2f} GB", flush=True)
    num_samples = max(1, args.tokens // args.seq_len)
    write_calibration_text(data, shape.vocab, max(num_samples * args.seq_len, args.heal_tokens) * 2)
    if not (student / "config.json").is_file():
        measure([*me, "_student", str(moe), str(student)])
    calibrate = [sys.executable, os.fspath(SCALE), "_calibrate", str(moe), str(data), "layerwise",
                 str(args.seq_len), str(num_samples), "cpu", "bfloat16", "bfloat16"]  # fmt: skip
    heal = [*me, "_heal", str(student), str(moe), str(data), str(workdir / "healed"), str(args.heal_tokens),
            str(args.seq_len)]  # fmt: skip
    runs: dict = {name: {"calibration_tokens_per_s": [], "calibration_peak_rss_bytes": [], "heal_tokens_per_s": []}
                  for name in SETTINGS}  # fmt: skip
    for round_ in range(args.rounds):
        for name, value in SETTINGS.items():
            os.environ[VARIABLE] = value
            m = measure(calibrate)
            runs[name]["calibration_tokens_per_s"].append(m.report["tokens"] / m.report["seconds"])
            runs[name]["calibration_peak_rss_bytes"].append(m.peak_rss_bytes)
            runs[name]["heal_tokens_per_s"].append(measure(heal).report["tokens_per_s"])
            print(f"round {round_ + 1}, cache {name}: calibration {runs[name]['calibration_tokens_per_s'][-1]:.1f} "
                  f"tok/s, peak RSS {m.peak_rss_bytes / GB:.2f} GB; heal {runs[name]['heal_tokens_per_s'][-1]:.1f} "
                  "tok/s", flush=True)  # fmt: skip
    off, on = (runs[name] for name in SETTINGS)

    def ratio(key: str) -> float:
        return statistics.median(off[key]) / statistics.median(on[key])

    return {
        "command": " ".join(["python", "benchmarks/onednn_cache.py", *sys.argv[1:]]),
        "checkpoint_gb": sum(f.stat().st_size for f in moe.glob("*.safetensors")) / GB,
        "runs": runs,
        "off_vs_default": {
            "calibration_tokens_per_s": ratio("calibration_tokens_per_s"),
            "calibration_peak_rss_gb": (
                statistics.median(off["calibration_peak_rss_bytes"])
                - statistics.median(on["calibration_peak_rss_bytes"])
            )
            / GB,
            "heal_tokens_per_s": ratio("heal_tokens_per_s"),
        },  # fmt: skip
    }


def format_table(results: dict) -> str:
    lines = [f"Checkpoint {results['checkpoint_gb']:.2f} GB (bf16). Command: `{results['command']}`.", "",
             "| oneDNN primitive cache | layer-streamed calibration, tokens/s | its peak RSS | `heal` bf16, tokens/s |",
             "|---|---|---|---|"]  # fmt: skip
    for name, run in results["runs"].items():
        tokens = ", ".join(f"{v:.1f}" for v in run["calibration_tokens_per_s"])
        peaks = ", ".join(f"{v / GB:.2f}" for v in run["calibration_peak_rss_bytes"])
        heals = ", ".join(f"{v:.1f}" for v in run["heal_tokens_per_s"])
        lines.append(f"| {name} | {tokens} | {peaks} GB | {heals} |")
    r = results["off_vs_default"]
    lines += ["", f"Off vs the default (medians): calibration {r['calibration_tokens_per_s']:.2f}x the tokens/s, "
              f"{r['calibration_peak_rss_gb']:+.2f} GB of peak RSS; heal {r['heal_tokens_per_s']:.2f}x the tokens/s."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_student":
        return child_student(*argv[1:])
    if argv and argv[0] == "_heal":
        student, teacher, data, out, tokens, seq_len = argv[1:]
        return child_heal(student, teacher, data, out, int(tokens), int(seq_len))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size on disk")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    parser.add_argument("--heal-tokens", type=int, default=6144, help="tokens of each heal (4 x seq-len a step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and token counts (seconds)")
    parser.add_argument("--workdir", help="where to generate (default: a temporary directory); reused if it holds one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size_gb, args.tokens, args.seq_len = min(args.size_gb, 0.004), min(args.tokens, 64), min(args.seq_len, 16)
        args.heal_tokens, args.rounds = min(args.heal_tokens, 512), 1
    results = run(args)
    print(json.dumps(results, indent=1))
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
