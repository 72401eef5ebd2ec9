# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The first run: convert a small trained MoE into a dense model and compare the two.

    python benchmarks/quickstart.py [--preset example] [--out DIR] [--max-tokens 20000]

What a new user would do, in about two minutes on 2 CPU cores (most of it building the
testbed the first time; it is cached under $MOE2DENSE_CACHE or ~/.cache/mergekit-moe2dense):

1. build (or reuse) the `example` testbed of benchmarks/testbed.py: an 8-expert top-2 Mixtral
   upcycled from a small dense model and trained further, with held-out text;
2. `inspect` the MoE (weights only) and take the conversion it recommends for a dense model
   (recommend.py, as `inspect` prints it): `aligned` experts -> `router_weighted` +
   `refit: down_proj` (configs/aligned.yml), otherwise `concat` + `refit: fit`
   (configs/from_scratch.yml);
3. convert it with calibration on the testbed's calib split (the equivalent YAML is written
   beside the model and the CLI command printed);
4. score the MoE and the dense model on the same held-out windows and print both, the ratio
   and a one-line verdict.

The whole method grid stays one flag away: `python benchmarks/quality.py --preset example --grid`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def recommended_config(verdict: str, moe: Path, calib: Path, seq_len: int) -> dict:
    """The conversion config for a verdict: the dense model `inspect` recommends, calibrated on `calib`."""
    from mergekit_moe2dense.recommend import recommend

    rec = recommend(verdict)
    calibration = {"dataset": str(calib), "num_samples": rec.num_samples, "seq_len": seq_len, "batch_size": 8}
    return rec.config(str(moe), calibration, dtype="float32")


def verdict_line(moe_ppl: float, dense_ppl: float, single_expert_width: bool = True) -> str:
    """The verdict `eval` prints too (mergekit_moe2dense.evaluation)."""
    from mergekit_moe2dense.evaluation import verdict_line

    return verdict_line(
        moe_ppl, dense_ppl, "the dense model" + (" at one expert's width" if single_expert_width else "")
    )


def run(preset: str, out: Path | None, cache_dir: str | None, max_tokens: int, progress: bool) -> dict:
    import transformers
    from mergekit.options import MergeOptions

    from benchmarks.testbed import build_testbed, default_cache_dir
    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig
    from mergekit_moe2dense.inspection import inspect_moe
    from mergekit_moe2dense.perplexity import evaluate_models, format_results_table, load_eval_documents

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every model load
    started = time.perf_counter()
    say = print
    say(f"1/4 testbed `{preset}` (built once, then cached)...", flush=True)
    testbed = build_testbed(preset, cache_dir=cache_dir)
    built = time.perf_counter()
    say(f"    {testbed.moe}  ({built - started:.0f} s)")

    say("2/4 inspect: can these experts be averaged?", flush=True)
    report = inspect_moe(str(testbed.moe))
    say(f"    verdict: {report.verdict} ({report.message})")
    say(f"    recommended: {report.recommendation.describe()}")

    out = out or Path(cache_dir or default_cache_dir()) / f"quickstart-{preset}-dense"
    say(f"3/4 convert -> {out}", flush=True)
    seq_len = min(256, json.loads((testbed.moe / "config.json").read_text())["max_position_embeddings"])
    spec = recommended_config(report.verdict, testbed.moe, testbed.calib_dir, seq_len)
    method = {"merge_method": spec["merge_method"], "parameters": spec["parameters"]}
    config = Moe2DenseConfig.model_validate(spec)
    build_dense(config, str(out), MergeOptions(quiet=not progress), overwrite=True)
    recipe = out.parent / f"{out.name}.yml"
    recipe.write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
    converted = time.perf_counter()
    say(f"    done in {converted - built:.0f} s; the same from the shell:")
    say(f"    mergekit-moe2dense {recipe} OUT")

    say("4/4 held-out perplexity, same windows for both models", flush=True)
    documents = load_eval_documents(testbed.test_dir)  # as `eval` reads it: each .txt file one stream
    moe_result, dense_result = evaluate_models(
        [str(testbed.moe), str(out)], documents, seq_len=seq_len, batch_size=8, max_tokens=max_tokens, progress=False
    )
    evaluated = time.perf_counter()
    moe_result.model, dense_result.model = "MoE", f"dense ({method['merge_method']})"
    say(format_results_table([moe_result, dense_result], reference="MoE"))
    # concat keeps the top-k experts side by side: a dense model k experts wide
    say(verdict_line(moe_result.perplexity, dense_result.perplexity, method["merge_method"] != "concat"))
    elapsed = time.perf_counter() - started
    say(f"total {elapsed:.0f} s. Every method on this testbed: python benchmarks/quality.py --preset {preset} --grid")
    return {
        "inspect_verdict": report.verdict,
        "method": method,
        "out": str(out),
        "moe_perplexity": moe_result.perplexity,
        "dense_perplexity": dense_result.perplexity,
        "ratio": dense_result.perplexity / moe_result.perplexity,
        "seconds": {
            "testbed": built - started,
            "convert": converted - built,
            "evaluate": evaluated - converted,
            "total": elapsed,
        },
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.testbed import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="example", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, help="where the dense model goes (default: beside the cached testbed)")
    parser.add_argument("--cache-dir", help="testbed cache (default: $MOE2DENSE_CACHE or ~/.cache/mergekit-moe2dense)")
    parser.add_argument("--max-tokens", type=int, default=20000, help="held-out tokens scored per domain")
    parser.add_argument("--progress", action="store_true", help="progress bars of the conversion")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args.preset, args.out, args.cache_dir, args.max_tokens, args.progress)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
