# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""How the command lines report what stopped them: a library error (`Moe2DenseError`) as
click's one-line message and status 1, Ctrl-C as "Error: interrupted" and status 130, never a
traceback. The library raises; only the command lines (`mergekit-moe2dense`, and
`mergekit-yaml` running one of our configs) turn errors into messages, here.
"""

from __future__ import annotations

import contextlib
import functools

import click

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["INTERRUPTED_EXIT_CODE", "Interrupted", "interrupts_as_errors", "one_line_errors", "run_mergekit_config"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a process killed by Ctrl-C


class Interrupted(click.ClickException):
    """Ctrl-C: one line and status 130 instead of a traceback (or click's "Aborted!" and 1)."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self):
        super().__init__("interrupted")


@contextlib.contextmanager
def interrupts_as_errors():
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted() from None


def one_line_errors(command):
    """A click command whose library errors are one-line messages."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Moe2DenseError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def run_mergekit_config(merge_config, out_path: str, options, config_source: str | None = None):
    """A config of ours that `mergekit-yaml` was given, converted (`build.build_from_mergekit`);
    under a click command (mergekit-yaml's) an error is its one-line message, called from Python
    it is raised as it is."""
    from mergekit_moe2dense.build import build_from_mergekit
    from mergekit_moe2dense.output_dir import OutputNotEmptyError

    try:
        return build_from_mergekit(merge_config, out_path, options, config_source)
    except Moe2DenseError as error:
        if click.get_current_context(silent=True) is None:
            raise
        if isinstance(error, OutputNotEmptyError):  # mergekit-yaml has no --overwrite
            raise click.ClickException(
                f"output directory {error.path} is not empty, and mergekit-yaml never replaces one: remove it or "
                "choose another OUT_PATH (or run mergekit-moe2dense CONFIG OUT_PATH --overwrite)"
            ) from None
        raise click.ClickException(str(error)) from None
