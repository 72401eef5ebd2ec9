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
  `OUT.incomplete-PID` and renamed into place.
- Every working directory a run makes is named with its PID (`OUT.incomplete-PID`,
  `OUT.collapse-PID`, the layer stream's spill directory) by `make_working_directory`,
  removed when the run ends, and removed by the next run when its process is dead (a
  run killed with SIGKILL): only those, never anything else.
- OUT's name leaves room for the names made beside it (`OUT.unpublished-PID` the
  longest) within the file system's limit on a name, checked before any work.
- Output files get the user's usual permissions (safetensors writes 0600 files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import threading
from collections.abc import Mapping

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = [
    "DiskFullError",
    "OutputDirectory",
    "OutputError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputNotEmptyError",
    "format_gb",
    "is_disk_full",
    "make_working_directory",
    "nearest_existing",
    "path_within",
    "remove_working_directory",
]

STAGING_INFIX = ".incomplete-"
COLLAPSE_INFIX = ".collapse-"  # collapse's trainer state and trained MoE, beside OUT
WORKING_INFIXES = (STAGING_INFIX, COLLAPSE_INFIX)  # removed with their dead run by any run to OUT
REPLACED_INFIX = ".replaced-"  # the old OUT, between the swap and its removal
UNPUBLISHED_INFIX = ".unpublished-"  # a finished output that could not be published
# Every name made beside OUT, a PID written as its largest value (Linux's pid_max is at most 2**22, 7 digits);
# `.checkpoints` is heal's default checkpoint directory
_SUFFIXES = (".lock", ".checkpoints") + tuple(
    infix + "9" * 7 for infix in (*WORKING_INFIXES, REPLACED_INFIX, UNPUBLISHED_INFIX)
)


class OutputError(Moe2DenseError, ValueError):
    """OUT cannot be written safely."""


class OutputExistsError(OutputError, FileExistsError):
    """OUT is not empty and --overwrite was not given, or it changed during the run."""


class OutputNotEmptyError(OutputExistsError):
    """OUT is not empty and --overwrite was not given; `path` is OUT (each command line names
    what replaces it in that command)."""

    def __init__(self, path: str):
        super().__init__(f"output directory {path} is not empty; pass --overwrite to replace it")
        self.path = path


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
        self._working: list[str] = []  # further working directories (`working_directory`)
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
        for label, value in self.inputs.items():
            if not os.path.exists(os.path.expanduser(value)):
                continue  # e.g. a datasets name, not a path
            relation = _overlap(self.path, os.path.expanduser(value))
            if relation:
                raise OutputError(
                    f"output path {self.path} {relation} {label} ({value}); choose an OUT outside every input"
                )
        if os.path.isdir(self.path) and os.listdir(self.path) and not self.overwrite:
            raise OutputNotEmptyError(self.path)
        existing = nearest_existing(self.parent)
        if not os.path.isdir(existing):
            raise OutputError(f"cannot create {self.path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to {existing} (no permission): choose another OUT")
        self._check_name_length(existing)

    def check_space(self, needed_bytes: int | None) -> None:
        """Refuse before any work when the output cannot fit (`needed_bytes` a lower bound)."""
        self.needed_bytes = needed_bytes
        if needed_bytes and needed_bytes > shutil.disk_usage(nearest_existing(self.parent)).free:
            raise DiskFullError(self._disk_full_message())

    # -- the run -----------------------------------------------------------------------
    def __enter__(self) -> OutputDirectory:
        self.check()
        os.makedirs(self.parent, exist_ok=True)
        self._lock()
        try:
            self.check()  # again under the lock: OUT may have changed while we waited for nothing
            self._snapshot = _snapshot(self.path)
            for infix in WORKING_INFIXES:  # those of runs killed with SIGKILL (under the lock: no live run's)
                remove_dead_working_directories(self.parent, os.path.basename(self.path) + infix)
            self.staging = make_working_directory(self.parent, os.path.basename(self.path) + STAGING_INFIX)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        try:
            for path in [*self._working, self.staging]:  # the staging directory is gone if published
                remove_working_directory(path)
        finally:
            self._unlock()
        if exc is not None and is_disk_full(exc):
            raise DiskFullError(self._disk_full_message()) from None

    def working_directory(self, infix: str) -> str:
        """`OUT{infix}PID` (`infix` one of WORKING_INFIXES), removed when the run ends."""
        path = make_working_directory(self.parent, os.path.basename(self.path) + infix)
        self._working.append(path)
        return path

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

    def _check_name_length(self, existing: str) -> None:
        """OUT's name plus the longest name made beside it must fit the file system's limit."""
        try:
            limit = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        name = os.path.basename(self.path)
        longest = max(len(suffix) for suffix in _SUFFIXES)
        if limit > 0 and len(os.fsencode(name)) + longest > limit:
            raise OutputError(
                f"output name {name[:40]}... is {len(os.fsencode(name))} bytes: with the names made beside it "
                f"(up to {longest} bytes more, as in OUT{UNPUBLISHED_INFIX}PID) it exceeds the limit of {limit} "
                f"bytes on a file name in {existing}; choose a name of at most {limit - longest} bytes"
            )

    def _disk_full_message(self) -> str:
        free = shutil.disk_usage(nearest_existing(self.parent)).free
        need = f"the output needs at least {format_gb(self.needed_bytes)}, " if self.needed_bytes else ""
        return f"not enough space on the device of {self.parent}: {need}{format_gb(free)} is free; free space or choose another OUT"


# -- working directories ------------------------------------------------------------------
_HELD: set[str] = set()  # the working directories this process made and has not removed
_HELD_LOCK = threading.RLock()


def make_working_directory(parent: str, prefix: str) -> str:
    """A new directory `parent/{prefix}PID` of this process (`.N` added when this process
    holds that name already), after removing the ones whose process is dead.

    Every command's working directory is made here, so one rule covers them all: the name
    says which process owns it, the owner removes it (`remove_working_directory`), and one
    that a killed process left is removed by the next process to make one with `prefix`.
    """
    with _HELD_LOCK:
        try:
            os.makedirs(parent, exist_ok=True)
            remove_dead_working_directories(parent, prefix)
            base = path = os.path.join(parent, f"{prefix}{os.getpid()}")
            number = 1
            while path in _HELD:
                number += 1
                path = f"{base}.{number}"
            os.mkdir(path)
        except OSError as error:
            raise OutputError(
                f"cannot create the working directory {os.path.join(parent, prefix)}{os.getpid()} "
                f"({error.strerror or error}); check {parent}'s permissions and free space"
            ) from None
        _HELD.add(path)
    return path


def remove_working_directory(path: str) -> None:
    """Remove a directory `make_working_directory` made, if it is still there."""
    with _HELD_LOCK:
        shutil.rmtree(path, ignore_errors=True)
        _HELD.discard(path)


def remove_dead_working_directories(parent: str, prefix: str) -> None:
    """`parent/{prefix}PID[.N]` directories whose process is gone (killed with SIGKILL), and
    those named with this process's PID that it did not make (left by an earlier process
    that had the same PID: PIDs repeat, in a container often exactly)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:\.\d+)?$")
    with _HELD_LOCK:
        for name in os.listdir(parent):
            match = pattern.match(name)
            path = os.path.join(parent, name)
            if not match or not os.path.isdir(path) or os.path.islink(path):
                continue
            pid = int(match.group(1))
            dead = path not in _HELD if pid == os.getpid() else not _alive(pid)
            if dead:
                shutil.rmtree(path, ignore_errors=True)


def _overlap(path: str, other: str) -> str | None:
    """How `path` lies to `other`, compared as real paths: "is", "is inside", "contains", or None."""
    path, other = os.path.realpath(path), os.path.realpath(other)
    if path == other:
        return "is"
    if path_within(path, other):
        return "is inside"
    return "contains" if path_within(other, path) else None


def path_within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it (both real paths)."""
    return os.path.commonpath([path, directory]) == directory


def nearest_existing(path: str) -> str:
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


def is_disk_full(exc: BaseException) -> bool:
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


def format_gb(size: int | None) -> str:
    return f"{(size or 0) / 1e9:.2f} GB"
