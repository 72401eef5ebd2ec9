# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`mergekit-moe2dense`: a thin click layer over the library, one command per library function.

    mergekit-moe2dense CONFIG OUT [--stats FILE|DIR] [--overwrite] [mergekit's merge options]
    mergekit-moe2dense eval MODEL [MODEL ...] [--data PATH] [--tasks hellaswag,./my_tasks] [--seq-len N] [--json FILE]
    mergekit-moe2dense inspect MOE [--stats FILE | --data PATH] [--output dense|moe] [--write-config YML] [--heatmap PNG]
    mergekit-moe2dense heal STUDENT OUT --teacher MOE --data PATH --max-tokens N [...]
    mergekit-moe2dense collapse MOE OUT --data PATH --max-tokens N [...]

Each command turns its flags into the library's typed settings (the conversion's
`Moe2DenseConfig`, `EvalSettings`, `InspectSettings`, `HealSettings`, `CollapseSettings`: their
fields are the flags' names), calls the library and prints what it returns. Library errors
become one-line messages and exit status 1, Ctrl-C "Error: interrupted" and 130
(`cli_errors.py`); the start-up around the commands (the default `merge` command, the
interrupt handler, the imports) is `cli_startup.py`. This module imports only click and those
two: torch and mergekit (seconds to import) load inside the commands.
"""

from __future__ import annotations

import os

import click

from mergekit_moe2dense.cli_errors import one_line_errors
from mergekit_moe2dense.cli_options import merge_options, output_quantization_option, quiet_option, version_option
from mergekit_moe2dense.cli_startup import DefaultCommandGroup


# `merge_command` is looked up when `merge` is first needed, so that a replacement of it is the
# one used
@click.group(
    cls=DefaultCommandGroup,
    default_command=lambda: merge_command(),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@version_option
def main():
    """Merge the experts of a Mixture-of-Experts model into a dense model.

    `merge` is the default command: `mergekit-moe2dense CONFIG OUT` runs `mergekit-moe2dense
    merge CONFIG OUT`.
    """


def merge_command() -> click.Command:
    """The `merge` command. Its mergekit options are declared without importing mergekit, so
    that drawing the help is instant; mergekit and torch load when it runs."""

    @click.command("merge")
    @click.argument("config_file", type=click.Path(dir_okay=False))
    @click.argument("out_path", type=click.Path(file_okay=False))
    @click.option(
        "--stats",
        "stats_path",
        type=click.Path(),
        help="Reuse router statistics from an earlier run (skips calibration): its output directory, or the "
        "statistics file (OUT/moe2dense/router_stats.safetensors; OUT/router_stats.safetensors before).",
    )
    @click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it is not empty.")
    @click.option(
        "--dry-run",
        is_flag=True,
        help="Print what would be done (method, calibration tokens, output, its size) and an estimate of the "
        "time and peak memory on this machine, then exit without writing anything.",
    )
    @output_quantization_option
    @merge_options
    @version_option
    @one_line_errors
    def merge(merge_options, config_file, out_path, stats_path, overwrite, dry_run, output_quantization):
        """Calibrate the MoE's routers, merge its experts, write a dense model to OUT_PATH (the
        default command)."""
        from mergekit_moe2dense.build import build_dense, estimate_build
        from mergekit_moe2dense.config import Moe2DenseConfig, read_config_text

        merge_options.apply_global_options()
        source = read_config_text(config_file)
        config = Moe2DenseConfig.from_yaml(source, source=config_file)
        if output_quantization is not None:
            config = config.model_copy(update={"output_quantization": output_quantization})
        if dry_run:
            estimate = estimate_build(config, out_path, merge_options, stats_path=stats_path, overwrite=overwrite)
            click.echo(estimate.format())
            return
        result = build_dense(
            config, out_path, merge_options, stats_path=stats_path, overwrite=overwrite, config_source=source
        )
        from mergekit_moe2dense.methods import get_method
        from mergekit_moe2dense.plan import SmallerMoEPlan

        weights = result.layer_weights  # [L, E], or [k, L, E] for k clusters (or a smaller MoE's k experts)
        plan_type = get_method(config.merge_method).plan_type(result.parameters)
        kind = "experts per layer" if plan_type is SmallerMoEPlan else "clusters"
        clusters = f", {weights.shape[0]} {kind}" if weights.dim() == 3 else ""
        click.echo(f"Wrote {result.out_path} ({config.merge_method}, {weights.shape[-2]} layers{clusters})")
        if result.summary is not None:
            click.echo(result.summary.format())

    return merge


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    multiple=True,
    help="Text to score (perplexity): .txt/.jsonl/.parquet, a directory of them, or a datasets name (repeatable).",
)
@click.option(
    "--tasks",
    multiple=True,
    help="lm-evaluation-harness tasks, comma-separated: task or group names (hellaswag,arc_easy) and local task "
    "directories (every task their YAML defines). Needs the [eval] extra.",
)
@click.option("--seq-len", default=512, show_default=True, help="Tokens per window.")
@click.option(
    "--stride",
    type=int,
    default=None,
    help="Sliding windows: each window starts this many tokens after the previous one and scores only the "
    "tokens it did not (default: seq-len, non-overlapping windows).",
)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens per source.")
@click.option("--limit", type=int, default=None, help="--tasks: at most this many examples per task.")
@click.option("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: each task's).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--reference", default=None, help="Model to report ratios and deltas against (default: the first).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option(
    "--card",
    type=click.Path(file_okay=False),
    default=None,
    help="Add the results to the model card (README.md) of this model directory.",
)
@quiet_option
@version_option
@one_line_errors
def eval_command(models, quiet, **flags):
    """Perplexity (--data) and standard benchmarks (--tasks) of one or more causal LMs, side by side."""
    from mergekit_moe2dense import EvalSettings, evaluate

    report = evaluate(list(models), EvalSettings(**flags), progress=not quiet)
    click.echo(report.table)
    if report.verdict:
        click.echo(report.verdict)


@main.command("inspect")
@click.argument("model")
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(),
    default=None,
    help="Router usage from the statistics of an earlier run: its OUT, or the file (OUT/moe2dense/router_stats.safetensors).",
)
@click.option(
    "--data",
    default=None,
    help="Router usage from a short calibration on this text (.txt/.jsonl/.parquet, a directory, or a datasets name).",
)
@click.option("--num-samples", default=32, show_default=True, help="Calibration sequences (with --data).")
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Tokens per calibration sequence (with --data; default: 256, or the model's context if shorter).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Device of the unit-matching products and of the calibration forward.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "full", "layerwise"]),
    default="auto",
    show_default=True,
    help="Calibration engine (with --data), as calibration.engine: the whole model, or streamed one decoder layer at a time.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Dtype of the calibration forward (with --data; default: float32 on CPU, bfloat16 on GPU).",
)
@click.option(
    "--max-units",
    default=512,
    show_default=True,
    help="Hidden units per expert matched (a random subsample when wider).",
)
@click.option(
    "--heatmap",
    "heatmap_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write per-layer expert cosine heatmaps to this image (.png, .pdf, .svg, ...: its extension sets the format).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option(
    "--output",
    type=click.Choice(["dense", "moe"]),
    default="dense",
    show_default=True,
    help="What the recommended conversion makes: a dense model, or a smaller MoE of the same family.",
)
@click.option(
    "--target-experts",
    type=int,
    default=None,
    help="With --output moe: routed experts per layer of the smaller MoE (default: half the model's).",
)
@click.option(
    "--write-config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the recommended conversion as a YAML config here, calibrated on --data "
    "(without --data: a placeholder to fill in); run it with `mergekit-moe2dense CONFIG OUT`.",
)
@quiet_option
@version_option
@one_line_errors
def inspect_command(model, quiet, **flags):
    """Whether merging MOE's experts by averaging can work (expert similarity, router usage, verdict),
    and the one conversion recommended for it."""
    from mergekit_moe2dense import InspectSettings, inspect

    report = inspect(model, InspectSettings(**flags), progress=not quiet)
    click.echo(report.format_table())


def training_options(*, lr: float, lm_weight: float, lm_weight_help: str):
    """The flags `heal` and `collapse` share (a `TrainSettings` each, but `--data`), with their
    own defaults of the learning rate and of the LM loss's weight."""
    options = [
        click.option("--data", required=True, help="Training text: .txt/.jsonl/.parquet, a directory of them, or a datasets name."),
        click.option("--max-tokens", type=int, required=True, help="Training tokens (rounded up to whole batches); the data is cycled if shorter."),
        click.option("--seq-len", default=512, show_default=True, help="Tokens per training sequence."),
        click.option("--batch-size", default=8, show_default=True, help="Sequences per step (per process under torchrun)."),
        click.option("--lr", default=lr, show_default=True, help="Peak learning rate (AdamW, warmup then cosine)."),
        click.option("--temperature", default=1.0, show_default=True, help="Distillation temperature T (the loss is scaled by T^2)."),
        click.option("--lm-weight", default=lm_weight, show_default=True, help=lm_weight_help),
        click.option("--warmup", default=0.05, show_default=True, help="Warmup, as a fraction of the steps."),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (under torchrun: each rank's GPU)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype (mixed precision on float32 weights; the teacher is loaded in it)."),
        click.option("--logging-steps", default=10, show_default=True),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty."),
    ]  # fmt: skip
    options.append(quiet_option)  # as on every command that draws progress bars

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def training_settings(flags: dict):
    """The flags of the training run taken out of `flags`, as the `TrainSettings` they make."""
    from mergekit_moe2dense import TrainSettings

    return TrainSettings(**{name: flags.pop(name) for name in list(flags) if name in TrainSettings.model_fields})


@main.command("heal")
@click.argument("student")
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--teacher", required=True, help="The MoE to distil from (a model directory).")
@click.option(
    "--hidden-weight",
    default=0.0,
    show_default=True,
    help="Add this weight x the hidden-state loss (each decoder layer's output against the teacher's, relative to its scale) to the KD/LM mix; needs the teacher on the fly, not --teacher-cache.",
)
@click.option(
    "--lora-rank",
    type=int,
    default=None,
    help="Train LoRA adapters of this rank (merged into the weights at the end) instead of every weight.",
)
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank).")
@click.option(
    "--teacher-cache",
    default=None,
    type=click.Path(file_okay=False),
    help="Store the teacher's top-k logits here first (streamed layer by layer), then train without the teacher in memory; reused when it matches.",
)
@click.option("--teacher-top-k", default=64, show_default=True, help="Logits per token kept in the teacher cache.")
@click.option("--eval-data", default=None, help="Held-out text: the student's perplexity before and after.")
@click.option("--eval-max-tokens", type=int, default=None, help="Score at most this many held-out tokens per source.")
@click.option("--save-steps", default=0, show_default=True, help="Checkpoint every N steps (0: none).")
@click.option(
    "--checkpoint-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where checkpoints go (default: OUT.checkpoints, removed after a successful run).",
)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the checkpoint directory.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoints after a successful run.")
@training_options(
    lr=1e-4, lm_weight=0.0, lm_weight_help="Weight w of the LM loss: (1 - w) x KD + w x LM (0: pure distillation)."
)
@version_option
@one_line_errors
def heal_command(out_path, overwrite, quiet, **flags):
    """Distil the MoE TEACHER into the converted dense model STUDENT (forward KL on next-token
    distributions, optionally mixed with the LM loss); write the healed model to OUT_PATH."""
    from mergekit_moe2dense import HealSettings, heal

    training = training_settings(flags)
    result = heal(HealSettings(training=training, **flags), out_path, overwrite=overwrite, progress=not quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    ppl = ""
    if result.perplexity_before is not None:
        ppl = f"; held-out perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}"
    resumed = result.record["resumed_from"]
    resumed = f", the first {result.steps_from_checkpoint} resumed from {resumed}" if resumed else ""
    click.echo(
        f"Wrote {result.out_path} ({result.steps} steps{resumed}, {result.tokens} tokens, "
        f"{result.tokens_per_s:.0f} tokens/s{ppl})"
    )


@main.command("collapse")
@click.argument("moe")
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--penalty-max", default=1e4, show_default=True, help="lambda at the end of the schedule.")
@click.option(
    "--schedule",
    type=click.Choice(["linear", "exponential", "constant"]),
    default="linear",
    show_default=True,
    help="How lambda rises over the run.",
)
@click.option("--save-moe", default=None, type=click.Path(file_okay=False), help="Also write the collapsed MoE here.")
@click.option(
    "--allow-inexact",
    is_flag=True,
    help="Write the dense model even if the experts did not collapse (recorded as not exact).",
)
@training_options(
    lr=1e-4, lm_weight=1.0, lm_weight_help="Weight w of the LM loss; 1 - w is KD from the original MoE (1: LM only)."
)
@version_option
@one_line_errors
def collapse_command(out_path, overwrite, quiet, **flags):
    """Train MOE with its experts pulled together (LM loss, or KD from the original with
    --lm-weight < 1, plus lambda(t) sum_e ||W_e - mean W||^2), then convert it with
    expert_uniform; write the dense model to OUT_PATH."""
    from mergekit_moe2dense import CollapseSettings, collapse

    training = training_settings(flags)
    result = collapse(CollapseSettings(training=training, **flags), out_path, overwrite=overwrite, progress=not quiet)
    exact = "" if result.record["exact"] else "; NOT exact, see its README.md"
    click.echo(
        f"Wrote {result.out_path} ({result.steps} steps, {result.tokens} tokens, expert spread {result.deviation:.3g}{exact})"
    )
