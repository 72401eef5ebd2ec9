# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The start of `mergekit-moe2dense`, before and around its commands.

- Ctrl-C at any moment after this module is imported is "Error: interrupted" and status 130:
  until a command runs, a handler of ours exits at once (nothing has been written yet); from
  then on it is a KeyboardInterrupt again, so that cleanups (staging) run, and
  `cli_errors.interrupts_as_errors` reports it.
- `DefaultCommandGroup` runs `merge` when the first argument is not a command name, and builds
  it on first use: its options come from mergekit, whose import loads torch.
- The imports of torch, transformers and mergekit (~6 s) run with the garbage collector off, and
  the disk starts on the source model's first shards meanwhile (`prefetch_source`).

This module imports only click and the prefetch helper: torch and mergekit load inside the
command group, where an interrupt is caught too.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable

import click

from mergekit_moe2dense.cli_errors import INTERRUPTED_EXIT_CODE, interrupts_as_errors
from mergekit_moe2dense.io.prefetch import available_memory, prefetch_model_start

__all__ = ["DefaultCommandGroup", "collector_on", "prefetch_source"]


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


class DefaultCommandGroup(click.Group):
    """Runs `merge` when the first argument is not a subcommand name.

    `merge` is built on first use by `default_command` (a callable returning the command): its
    options come from mergekit, whose import loads torch. Parsing and running a command happen
    inside `interrupts_as_errors`.
    """

    default_command_name = "merge"

    def __init__(self, *args, default_command: Callable[[], click.Command], **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def list_commands(self, ctx):
        return sorted({*self.commands, self.default_command_name})

    def get_command(self, ctx, name):
        if name == self.default_command_name and name not in self.commands:
            self.add_command(self.default_command())
        collector_on()  # the imports are done
        return super().get_command(ctx, name)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.list_commands(ctx) and args[0] not in ("--help", "-h"):
            args = [self.default_command_name, *args]
        if len(args) > 1 and args[0] == self.default_command_name:
            prefetch_source(args[1])  # before get_command's imports
        # The imports (torch, transformers, mergekit: ~6 s, in get_command) make few cycles, but
        # trigger collector passes over everything imported so far: ~1.2 s of them
        gc.disable()
        try:
            return super().parse_args(ctx, args)
        except BaseException:
            collector_on()
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
                collector_on()


def collector_on() -> None:
    """The garbage collector back on after the imports, their objects frozen: they need no
    further collector passes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def prefetch_source(config_file: str) -> None:
    """Starts the disk on the source model's first shards (`io.prefetch.prefetch_model_start`) while
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
