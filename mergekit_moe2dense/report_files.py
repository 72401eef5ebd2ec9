# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The report files the commands write at the end (`eval --json`, `inspect --json`/`--heatmap`).

They are checked before any model is loaded, so that a typo in a path does not cost a whole
evaluation and a report never replaces an input (a model's config.json, a data file), and
written atomically: a report path holds its old content or the whole new report, never a
partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.output_dir import path_within

__all__ = ["ReportFileError", "atomic_report", "check_report_file", "check_reports", "write_report_text"]


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


def check_reports(reports: Mapping[str, str | None], inputs: Iterable[tuple[str, str]]) -> None:
    """Every report ({flag: path}, None for one not asked) can be written, and is not, nor lies
    inside, an input ((label, path) pairs: every model, data path, statistics file...), nor is
    another report; compared as real paths, so a symbolic link to an input is refused too.
    Inputs that are not paths (a datasets name, a hub model) are skipped."""
    inputs = [(label, value, os.path.realpath(os.path.expanduser(value))) for label, value in inputs if value]
    seen: dict[str, str] = {}
    for flag, path in reports.items():
        if path is None:
            continue
        check_report_file(path, flag)
        real = os.path.realpath(path)
        for label, value, other in inputs:
            if os.path.exists(other) and path_within(real, other):
                relation = "is" if real == other else "is inside"
                raise ReportFileError(
                    f"{flag} {path} {relation} the {label} {value}: writing it would damage an input; "
                    "write reports outside every model and data path"
                )
        if real in seen:
            raise ReportFileError(f"{flag} {path} is also {seen[real]}: give each report its own path")
        seen[real] = flag


@contextlib.contextmanager
def atomic_report(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` for the block to write; moved onto `path` (`os.replace`)
    when the block completes, removed when it fails. The report gets the usual permissions of
    a new file (0666 less the umask), not the temporary file's 0600."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as error:
        raise ReportFileError(f"cannot write {os.fspath(path)} ({error.strerror or error})") from None
    os.close(handle)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a directory removed meanwhile
        _remove(temporary)
        raise ReportFileError(f"cannot write {os.fspath(path)} ({error.strerror or error})") from None
    except BaseException:
        _remove(temporary)
        raise


def write_report_text(path: str | os.PathLike, text: str) -> None:
    """`text` written to `path` atomically (see `atomic_report`)."""
    with atomic_report(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
