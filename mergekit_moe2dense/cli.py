# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`mergekit-moe2dense`: a thin click layer over the library.

    mergekit-moe2dense CONFIG OUT [--stats FILE|DIR] [--overwrite] [mergekit's merge options]
    mergekit-moe2dense eval MODEL [MODEL ...] [--data PATH] [--tasks hellaswag,./my_tasks] [--seq-len N] [--json FILE]
    mergekit-moe2dense inspect MOE [--stats FILE | --data PATH] [--heatmap PNG] [--json FILE]
    mergekit-moe2dense heal STUDENT OUT --teacher MOE --data PATH --max-tokens N [...]
    mergekit-moe2dense collapse MOE OUT --data PATH --max-tokens N [...]

Library errors (`Moe2DenseError`) become one-line messages and exit status 1;
Ctrl-C, at any moment after this module is imported, "Error: interrupted" and 130.
This module imports only click: torch and mergekit (seconds to import) load inside
the command group, where an interrupt is caught too.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import sys
import threading

import click

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.prefetch import available_memory, prefetch_model_start

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a process killed by Ctrl-C


class Interrupted(click.ClickException):
    """Ctrl-C: one line and status 130 instead of a traceback (or click's "Aborted!" and 1)."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self):
        super().__init__("interrupted")


def _interrupted_before_main(_signum, _frame):
    """Ctrl-C after this module is imported but before a command runs (the console script's
    wrapper, click's start and the parsing, with the imports it triggers): nothing has been
    written yet, so exit at once."""
    sys.stderr.write("Error: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)


def _started_as_console_script() -> bool:
    return os.path.basename(sys.argv[0] if sys.argv else "").startswith("mergekit-moe2dense")


# Only for the console script: a library or test importing this module keeps Python's handler.
if (
    _started_as_console_script()
    and threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _interrupted_before_main)


@contextlib.contextmanager
def interrupts_as_errors():
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted() from None


def one_line_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Moe2DenseError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


class DefaultCommandGroup(click.Group):
    """Runs `merge` when the first argument is not a subcommand name.

    `merge` is built on first use (`merge_command`): its options come from
    mergekit, whose import loads torch. Parsing and running a command happen
    inside `interrupts_as_errors`.
    """

    default_command = "merge"

    def list_commands(self, ctx):
        return sorted({*self.commands, self.default_command})

    def get_command(self, ctx, name):
        if name == self.default_command and name not in self.commands:
            self.add_command(merge_command())
        _collector_on()  # the imports are done
        return super().get_command(ctx, name)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.list_commands(ctx) and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        if len(args) > 1 and args[0] == self.default_command:
            _prefetch_source(args[1])  # before get_command's imports
        # The imports (torch, transformers, mergekit: ~6 s, in get_command) make few cycles, but
        # trigger collector passes over everything imported so far: ~1.2 s of them
        gc.disable()
        try:
            return super().parse_args(ctx, args)
        except BaseException:
            _collector_on()
            raise

    def make_context(self, *args, **kwargs):
        with interrupts_as_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with interrupts_as_errors():
            # From here on an interrupt is a KeyboardInterrupt again, so cleanups (staging) run.
            # Restored here, not in click's `main`: there, before parsing, click would turn it into
            # "Aborted!" and status 1; until here nothing has been written, so exiting is safe.
            if signal.getsignal(signal.SIGINT) is _interrupted_before_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                return super().invoke(ctx)
            finally:
                _collector_on()


def _collector_on() -> None:
    """The garbage collector back on after the imports, their objects frozen: they need no
    further collector passes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _prefetch_source(config_file: str) -> None:
    """Starts the disk on the source model's first shards (`prefetch.prefetch_model_start`) while
    Python imports torch, transformers and mergekit, ~6 s in which a cold disk would sit idle.
    Up to 4 GB, and no more than an eighth of the available memory, so the pages are still cached
    when the run reaches them. Only a hint: a config it cannot read is left to the command."""
    try:
        import yaml

        with open(config_file, encoding="utf-8") as handle:
            model = yaml.safe_load(handle)["models"][0]["model"]
        if not isinstance(model, str) or not os.path.isdir(model):
            return
        prefetch_model_start(model, min(4 << 30, available_memory() // 8))
    except Exception:  # noqa: BLE001 - the command reports a bad config itself
        return


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Merge the experts of a Mixture-of-Experts model into a dense model."""


def merge_command() -> click.Command:
    """The `merge` command; building it imports mergekit (and torch) for its options."""
    from mergekit.options import MergeOptions, add_merge_options

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
    @add_merge_options
    @one_line_errors
    def merge(merge_options: MergeOptions, config_file, out_path, stats_path, overwrite):
        """Calibrate the MoE's routers, merge its experts, write a dense model to OUT_PATH."""
        from mergekit_moe2dense.build import build_dense
        from mergekit_moe2dense.config import Moe2DenseConfig, read_config_text

        merge_options.apply_global_options()
        source = read_config_text(config_file)
        config = Moe2DenseConfig.from_yaml(source, source=config_file)
        result = build_dense(
            config, out_path, merge_options, stats_path=stats_path, overwrite=overwrite, config_source=source
        )
        from mergekit_moe2dense.methods import get_method

        weights = result.layer_weights  # [L, E], or [k, L, E] for k clusters (or a smaller MoE's k experts)
        kind = "experts per layer" if get_method(config.merge_method).writes_moe else "clusters"
        clusters = f", {weights.shape[0]} {kind}" if weights.dim() == 3 else ""
        click.echo(f"Wrote {result.out_path} ({config.merge_method}, {weights.shape[-2]} layers{clusters})")

    return merge


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    "data_paths",
    multiple=True,
    help="Text to score (perplexity): .txt/.jsonl/.parquet, a directory of them, or a datasets name (repeatable).",
)
@click.option(
    "--tasks",
    "task_specs",
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
@one_line_errors
def evaluate(
    models,
    data_paths,
    task_specs,
    seq_len,
    stride,
    batch_size,
    max_tokens,
    limit,
    num_fewshot,
    device,
    reference,
    json_path,
):
    """Perplexity (--data) and standard benchmarks (--tasks) of one or more causal LMs, side by side."""
    import json

    from mergekit_moe2dense.devices import check_device
    from mergekit_moe2dense.evaluate import (
        EvaluationError,
        evaluate_models,
        format_results_table,
        load_eval_documents,
    )
    from mergekit_moe2dense.report_files import check_reports, write_report_text

    if not data_paths and not task_specs:
        raise EvaluationError("eval needs --data (perplexity), --tasks (lm-eval benchmarks), or both")
    task_items = [item.strip() for spec in task_specs for item in spec.split(",")]
    inputs = [("model", m) for m in models] + [("--data", d) for d in data_paths] + [("--tasks", t) for t in task_items]
    check_reports({"--json": json_path}, inputs)  # before any model is scored
    check_device(device)
    reference = reference or models[0]
    tasks = None
    if task_specs:
        from mergekit_moe2dense.harness import evaluate_tasks, format_task_table, parse_tasks

        tasks = parse_tasks(list(task_specs))  # lm-eval installed, every task known: before any model runs
    payload = [{"model": model} for model in models]
    if data_paths:
        documents = [doc for path in data_paths for doc in load_eval_documents(path)]
        results = evaluate_models(
            list(models),
            documents,
            seq_len=seq_len,
            stride=stride,
            batch_size=batch_size,
            max_tokens=max_tokens,
            device=device,
        )
        click.echo(format_results_table(results, reference=reference))
        payload = [r.to_dict() for r in results]
    if tasks is not None:
        scored = evaluate_tasks(
            list(models), tasks, batch_size=batch_size, device=device, limit=limit, num_fewshot=num_fewshot
        )
        if data_paths:
            click.echo("")
        click.echo(format_task_table(scored, reference=reference))
        for entry, result in zip(payload, scored):
            entry["tasks"] = result.scores
    if json_path:
        write_report_text(json_path, json.dumps(payload, indent=2) + "\n")


@main.command("inspect")
@click.argument("model")
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Router usage from the statistics file of an earlier run (OUT/moe2dense/router_stats.safetensors).",
)
@click.option(
    "--data",
    default=None,
    help="Router usage from a short calibration on this text (.txt/.jsonl/.parquet, a directory, or a datasets name).",
)
@click.option("--num-samples", default=32, show_default=True, help="Calibration sequences (with --data).")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration sequence (with --data).")
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
@one_line_errors
def inspect(model, stats_path, data, num_samples, seq_len, device, engine, dtype, max_units, heatmap_path, json_path):
    """Whether merging MOE's experts by averaging can work: expert similarity, router usage, verdict."""
    from mergekit_moe2dense.inspection import inspect_moe

    report = inspect_moe(
        model,
        stats_path=stats_path,
        data=data,
        num_samples=num_samples,
        seq_len=seq_len,
        device=device,
        engine=engine,
        dtype=dtype,
        max_units=max_units,
        heatmap_path=heatmap_path,
        json_path=json_path,
        progress=True,
    )
    click.echo(report.format_table())


def training_options(*, lr: float, lm_weight: float, lm_weight_help: str):
    """The flags `heal` and `collapse` share (a `training.TrainSettings` each), with their
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
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]  # fmt: skip

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _settings(**values):
    from mergekit_moe2dense.heal import TrainSettings

    return TrainSettings(**values)


@main.command("heal")
@click.argument("student")
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--teacher", required=True, help="The MoE to distil from (a model directory).")
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
@one_line_errors
def heal_command(student, out_path, teacher, lora_rank, lora_alpha, teacher_cache, teacher_top_k, eval_data,
                 eval_max_tokens, save_steps, checkpoint_dir, resume, keep_checkpoints, overwrite, quiet, **training):  # fmt: skip
    """Distil the MoE TEACHER into the converted dense model STUDENT (forward KL on next-token
    distributions, optionally mixed with the LM loss); write the healed model to OUT_PATH."""
    from mergekit_moe2dense.heal import heal

    result = heal(
        student, out_path, teacher=teacher, data=training.pop("data"),
        settings=_settings(save_steps=save_steps, **training), lora_rank=lora_rank, lora_alpha=lora_alpha,
        teacher_cache=teacher_cache, teacher_top_k=teacher_top_k, eval_data=eval_data,
        eval_max_tokens=eval_max_tokens, checkpoint_dir=checkpoint_dir, resume=resume,
        keep_checkpoints=keep_checkpoints, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
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
@one_line_errors
def collapse_command(moe, out_path, penalty_max, schedule, save_moe, allow_inexact, overwrite, quiet, **training):
    """Train MOE with its experts pulled together (LM loss, or KD from the original with
    --lm-weight < 1, plus lambda(t) sum_e ||W_e - mean W||^2), then convert it with
    expert_uniform; write the dense model to OUT_PATH."""
    from mergekit_moe2dense.heal import collapse

    result = collapse(
        moe, out_path, data=training.pop("data"), settings=_settings(**training), penalty_max=penalty_max,
        schedule=schedule, save_moe=save_moe, allow_inexact=allow_inexact, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    exact = "" if result.record["exact"] else "; NOT exact, see its README.md"
    click.echo(
        f"Wrote {result.out_path} ({result.steps} steps, {result.tokens} tokens, expert spread {result.deviation:.3g}{exact})"
    )
