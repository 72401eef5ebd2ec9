# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Checks on the report files the commands write at the end (`eval --json`,
`inspect --json`/`--heatmap`), made before any model is loaded so that a typo in a
path does not cost a whole evaluation."""

from __future__ import annotations

import os
import tempfile

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["ReportFileError", "check_report_file"]


class ReportFileError(Moe2DenseError, ValueError):
    """A report file cannot be written where asked."""


def check_report_file(path: str | None, what: str) -> None:
    """Refuses a `path` (None: nothing to check) whose directory is missing or not
    writable, or that is a directory or a read-only file. `what` names it in the message."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ReportFileError(f"{what} {path} is a directory")
    if not os.path.isdir(parent):
        raise ReportFileError(f"{what} {path}: directory {parent} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ReportFileError(f"{what} {path} is not writable")
        return
    try:  # creating a file is the only test that also holds for root, ACLs and read-only mounts
        handle, probe = tempfile.mkstemp(prefix=".moe2dense-probe-", dir=parent)
    except OSError as error:
        raise ReportFileError(f"{what} {path}: cannot write in {parent} ({error.strerror})") from None
    os.close(handle)
    os.remove(probe)
