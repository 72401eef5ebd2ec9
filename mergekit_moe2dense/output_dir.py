# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Where a run writes: OUT is checked before any work, locked for the run's
lifetime, assembled in a staging directory beside it and published only when
complete (docs/safety.md states the guarantees).

- The inputs are never touched: OUT may not be, contain or sit inside any input
  (the model, the calibration data, a statistics file, the config, a teacher),
  compared as resolved real paths.
- Nothing is deleted that the check did not see: with `--overwrite`, OUT's
  contents are recorded when the run starts, and publishing refuses if they
  changed meanwhile. A second run to the same OUT is refused while the first
  holds the lock (`OUT.lock`, an advisory `flock`).
- OUT appears complete or not at all: the output is written into
  `OUT.incomplete-PID` and renamed into place; the staging directories of dead
  runs are removed by the next run to the same OUT (only those, never anything else).
- Output files get the user's usual permissions (safetensors writes 0600 files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Mapping

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["DiskFullError", "OutputDirectory", "OutputError", "OutputExistsError", "OutputLockedError"]

STAGING_INFIX = ".incomplete-"
REPLACED_INFIX = ".replaced-"  # the old OUT, between the swap and its removal
UNPUBLISHED_INFIX = ".unpublished-"  # a finished output that could not be published


class OutputError(Moe2DenseError, ValueError):
    """OUT cannot be written safely."""


class OutputExistsError(OutputError, FileExistsError):
    """OUT is not empty and --overwrite was not given, or it changed during the run."""


class OutputLockedError(OutputError):
    """Another run is writing to OUT."""


class DiskFullError(OutputError):
    """The file system holding OUT ran out of space."""


Snapshot = list[tuple[str, bool, int, int, int]] | None  # None: OUT did not exist


class OutputDirectory:
    """OUT for one run. Use as a context manager around all the work::

        out = OutputDirectory(path, overwrite=False, inputs={"the model": model_path})
        out.check()                       # cheap, before anything expensive
        with out:                         # lock, clean stale staging, make the staging dir
            write_everything(out.staging)
            out.publish()

    Leaving the block without `publish` removes the staging directory.
    """

    def __init__(
        self,
        path: str,
        *,
        overwrite: bool = False,
        inputs: Mapping[str, str | None] | None = None,
    ):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self.inputs = {label: value for label, value in (inputs or {}).items() if value}
        self.needed_bytes: int | None = None  # a lower bound of the output's size (`check_space`)
        self.parent = os.path.dirname(self.path)
        self.staging = f"{self.path}{STAGING_INFIX}{os.getpid()}"
        self._snapshot: Snapshot = None
        self._lock_fd: int | None = None
        self._published = False

    # -- before any work ---------------------------------------------------------------
    def check(self) -> None:
        """Every refusal that needs no lock: symlinks, inputs, emptiness, writability."""
        if os.path.islink(self.path):
            raise OutputError(f"output path {self.path} is a symbolic link; give the directory itself")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputExistsError(f"output path {self.path} exists and is not a directory")
        real = os.path.realpath(self.path)
        for label, value in self.inputs.items():
            other = os.path.realpath(os.path.expanduser(value))
            if not os.path.exists(other):
                continue  # e.g. a datasets name, not a path
            if _within(real, other) or _within(other, real):
                relation = "is" if real == other else ("is inside" if _within(real, other) else "contains")
                raise OutputError(
                    f"output path {self.path} {relation} {label} ({value}); choose an OUT outside every input"
                )
        if os.path.isdir(self.path) and os.listdir(self.path) and not self.overwrite:
            raise OutputExistsError(f"output directory {self.path} is not empty; pass --overwrite to replace it")
        existing = _nearest_existing(self.parent)
        if not os.path.isdir(existing):
            raise OutputError(f"cannot create {self.path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to {existing} (no permission): choose another OUT")

    def check_space(self, needed_bytes: int | None) -> None:
        """Refuse before any work when the output cannot fit (`needed_bytes` a lower bound)."""
        self.needed_bytes = needed_bytes
        if needed_bytes and needed_bytes > shutil.disk_usage(_nearest_existing(self.parent)).free:
            raise DiskFullError(self._disk_full_message())

    # -- the run -----------------------------------------------------------------------
    def __enter__(self) -> OutputDirectory:
        self.check()
        os.makedirs(self.parent, exist_ok=True)
        self._lock()
        try:
            self.check()  # again under the lock: OUT may have changed while we waited for nothing
            self._snapshot = _snapshot(self.path)
            self._remove_stale_staging()
            os.makedirs(self.staging)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        try:
            if not self._published:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._unlock()
        if exc is not None and _is_disk_full(exc):
            raise DiskFullError(self._disk_full_message()) from None

    def publish(self) -> None:
        """Swap the finished staging directory into place, unless OUT changed since the check."""
        if _snapshot(self.path) != self._snapshot:
            kept = f"{self.path}{UNPUBLISHED_INFIX}{os.getpid()}"
            os.replace(self.staging, kept)  # not a staging name: no later run removes it
            self._published = True
            raise OutputExistsError(
                f"output directory {self.path} changed while this run was working; nothing there was "
                f"replaced, and the finished output is in {kept}"
            )
        _fix_permissions(self.staging)
        replaced = None
        if os.path.isdir(self.path):
            replaced = f"{self.path}{REPLACED_INFIX}{os.getpid()}"
            os.replace(self.path, replaced)
        os.replace(self.staging, self.path)
        self._published = True
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------
    def _lock(self) -> None:
        """An exclusive flock on OUT.lock, retried if another run unlinked the file meanwhile."""
        lock_path = f"{self.path}.lock"
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f" (process {holder})" if holder else ""
                raise OutputLockedError(f"another run{who} is writing to {self.path}; wait for it to finish") from None
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)  # the file we locked was removed by a finishing run: lock the new one

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(f"{self.path}.lock")  # while still locked: a waiting run re-opens the path
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_stale_staging(self) -> None:
        """`OUT.incomplete-PID` directories whose process is gone (a run killed with SIGKILL)."""
        pattern = re.compile(re.escape(os.path.basename(self.path) + STAGING_INFIX) + r"(\d+)$")
        for name in os.listdir(self.parent):
            match = pattern.match(name)
            path = os.path.join(self.parent, name)
            if match and os.path.isdir(path) and not os.path.islink(path) and not _alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)

    def _disk_full_message(self) -> str:
        free = shutil.disk_usage(_nearest_existing(self.parent)).free
        need = f"the output needs at least {_gb(self.needed_bytes)}, " if self.needed_bytes else ""
        return f"not enough space on the device of {self.parent}: {need}{_gb(free)} is free; free space or choose another OUT"


def _within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it (both real paths)."""
    return os.path.commonpath([path, directory]) == directory


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _snapshot(path: str) -> Snapshot:
    """What OUT holds: every entry's relative path, kind, size, mtime and inode."""
    if not os.path.isdir(path):
        return None
    entries = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            info = os.lstat(full)
            entries.append((os.path.relpath(full, path), name in dirs, info.st_size, info.st_mtime_ns, info.st_ino))
    return sorted(entries)


def _fix_permissions(root: str) -> None:
    """Files 0666 and directories 0777, less the user's umask (what `open` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the chain; safetensors reports it as text (`StorageFull`, code 28)."""
    seen: dict[int, bool] = {}
    while exc is not None and id(exc) not in seen:
        seen[id(exc)] = True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _gb(size: int | None) -> str:
    return f"{(size or 0) / 1e9:.2f} GB"
