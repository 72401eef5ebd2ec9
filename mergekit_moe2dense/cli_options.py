# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The flags several commands share, declared without importing torch or mergekit.

- `merge_options`: mergekit's merge options (those of `mergekit-yaml`), drawn from a table of
  their names, types and defaults, so that `merge --help` is instant: mergekit's own
  `add_merge_options` imports torch and transformers (~6 s) only to draw them. The command gets a
  `MergeOptions` built as mergekit's decorator builds it. The options this tool refuses
  (`options.REFUSED`) are hidden from the help; set, they are still refused with their reason.
- `version_option`: `--version`, on the group and on every command.
- `quiet_option`: `--quiet`, no progress bars, on every command that draws them.
- `output_quantization_option`: `--output-quantization`, the config's `output_quantization` from the
  command line (`merge`).

tests/test_cli_consistency.py checks the table against mergekit's `add_merge_options`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from mergekit_moe2dense import __version__
from mergekit_moe2dense.options import REFUSED

__all__ = [
    "MERGEKIT_OPTIONS",
    "MergekitOption",
    "merge_options",
    "output_quantization_option",
    "quiet_option",
    "version_option",
]


class ShardSize(click.ParamType):
    """A parameter count such as 5B or 500M, read by mergekit's own parser when the command runs."""

    name = "size"

    def convert(self, value, param, ctx):
        from mergekit.common import parse_kmb

        return parse_kmb(value)


@dataclass(frozen=True)
class MergekitOption:
    """One field of mergekit's `MergeOptions` as a flag: what `add_merge_options` declares."""

    name: str
    type: type | click.ParamType
    default: object
    help: str
    decls: tuple[str, ...] = ()  # default: --name, and --no-name for a bool
    show_default: bool = True
    extra: tuple[tuple[str, object], ...] = ()  # further click.option keywords

    def option(self):
        flag = "--" + self.name.replace("_", "-")
        decls = self.decls or ((f"{flag}/--no-{flag[2:]}",) if self.type is bool else (flag,))
        return click.option(
            *decls,
            type=self.type,
            default=self.default,
            help=self.help,
            show_default=self.show_default,
            hidden=self.name in REFUSED,
            **dict(self.extra),
        )


# In mergekit's order, with its help texts and defaults (`mergekit.options`)
MERGEKIT_OPTIONS = (
    MergekitOption("allow_crimes", bool, False, "Allow mixing architectures"),
    MergekitOption(
        "unsafe_truncate_embeddings",
        bool,
        False,
        "UNSAFE: discard trailing embedding rows to match the smallest vocabulary. Assumes identical token IDs; "
        "use tokenizer configuration instead.",
    ),
    MergekitOption("transformers_cache", str, None, "Override storage path for downloaded models"),
    MergekitOption("lora_merge_cache", str, None, "Path to store merged LORA models"),
    MergekitOption("lora_merge_dtype", str, None, "Override dtype when applying LoRAs"),
    MergekitOption("cuda", bool, False, "Perform matrix arithmetic on GPU"),
    MergekitOption("device", str, None, "Perform matrix arithmetic on specified device"),
    MergekitOption(
        "low_cpu_memory", bool, False, "Store results and intermediate values on accelerator. Useful if VRAM > RAM"
    ),
    MergekitOption(
        "out_shard_size",
        ShardSize(),
        5_000_000_000,
        "Number of parameters per output shard  [default: 5B]",
        show_default=False,
    ),
    MergekitOption("copy_tokenizer", bool, True, "Copy a tokenizer to the output"),
    MergekitOption(
        "clone_tensors", bool, False, "Clone tensors before saving, to allow multiple occurrences of the same layer"
    ),
    MergekitOption("trust_remote_code", bool, False, "Trust remote code from huggingface repos (danger)"),
    MergekitOption("random_seed", int, None, "Seed for reproducible use of randomized merge methods"),
    MergekitOption("lazy_unpickle", bool, False, "Experimental lazy unpickler for lower memory usage"),
    MergekitOption("write_model_card", bool, True, "Output README.md containing details of the merge"),
    MergekitOption(
        "safe_serialization",
        bool,
        True,
        "Save output in safetensors. Do this, don't poison the world with more pickled models.",
    ),
    MergekitOption(
        "verbosity",
        int,
        0,
        "Verbose logging (repeat for more verbosity)",
        decls=("-v", "verbosity"),
        show_default=False,
        extra=(("count", True),),
    ),
    MergekitOption("quiet", bool, False, "Suppress progress bars and other non-essential output"),
    MergekitOption("read_to_gpu", bool, False, "Read model weights directly to accelerator"),
    MergekitOption("multi_gpu", bool, False, "Use multi-gpu parallel graph execution engine"),
    MergekitOption(
        "num_threads", int, None, "Number of threads to use for parallel CPU operations", decls=("--num-threads", "-j")
    ),
    MergekitOption(
        "gpu_rich",
        bool,
        False,
        "Alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu",
        decls=("--gpu-rich",),
        extra=(("is_flag", True),),
    ),
    MergekitOption(
        "async_write", bool, False, "Write output shards asynchronously (faster execution, higher memory use)"
    ),
    MergekitOption("write_threads", int, 1, "Number of threads to use for asynchronous writes"),
)


def merge_options(command):
    """mergekit's merge options on `command`, which gets them as one `merge_options` argument (a
    `MergeOptions`, built as mergekit's `add_merge_options` builds it)."""
    names = [spec.name for spec in MERGEKIT_OPTIONS]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mergekit.options import MergeOptions

        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        return command(*args, merge_options=MergeOptions(**values), **kwargs)

    for spec in reversed(MERGEKIT_OPTIONS):
        wrapper = spec.option()(wrapper)
    return wrapper


def version_option(command):
    """`--version`: the package's version (read without importing the library)."""
    return click.version_option(__version__, "--version", prog_name="mergekit-moe2dense")(command)


def quiet_option(command):
    return click.option("--quiet", is_flag=True, help="No progress bars.")(command)


def output_quantization_option(command):
    """`--output-quantization`: the config's `output_quantization`, which it overrides (the choices are
    config.OutputQuantization's, written out here so that the help imports no pydantic)."""
    return click.option(
        "--output-quantization",
        type=click.Choice(["source", "none", "fp8"]),
        default=None,
        help="What the output is written in (overrides the config's output_quantization): source keeps a "
        "block-wise FP8 or MXFP4 source's format in an MoE output (kept experts bit for bit, merged ones "
        "quantized), none dequantizes, fp8 writes the linear weights and experts in block-wise FP8. "
        "Default: source for an MoE output, none for a dense one.",
    )(command)
