# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Reading checkpoint bytes with `O_DIRECT`: from the disk straight into our own buffers.

A plain read copies every byte out of the page cache, and on a virtual machine that copy costs
more CPU than the merge's arithmetic: a cold read of a 3.96 GB checkpoint took 4.6-7.4 s, 4.0-7.1 s
of it system time, against 1.8-2.7 s and 0.1 s with `O_DIRECT` (docs/results/scale.md, "Merge with
O_DIRECT reads"). The merge reads each expert once, so the page cache gains it nothing.

- Bytes the page cache already holds (a repeated run, the command line's start-up prefetch) are
  copied from it with a plain read: `DirectFile.resident` asks the kernel (`mincore` on a mapping
  of the file, which reads nothing).
- `O_DIRECT` wants the file offset, the length and the buffer's address aligned to the device's
  block size: reads cover the aligned range around the bytes asked for, into page-aligned buffers
  (`AlignedBuffer`), and the caller takes its bytes from inside.
- A file system without `O_DIRECT` (tmpfs, some FUSE mounts), or a platform without it or without
  libc's `mincore`, is read plainly: `DirectFile.open` returns None and the caller reads as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

__all__ = ["ALIGN", "AlignedBuffer", "DirectFile"]

ALIGN = 4096  # a multiple of every block size O_DIRECT asks for (512 or 4096)
_PAGE = mmap.PAGESIZE


def _libc():
    """libc's mmap, munmap and mincore through ctypes (Python's mmap cannot give the address of a
    read-only mapping), or None off Linux-like systems."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        functions = libc.mmap, libc.munmap, libc.mincore
    except (OSError, AttributeError):
        return None
    mmap_, munmap, mincore = functions
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    mmap_.restype = ctypes.c_void_p
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return functions


_LIBC = _libc() if hasattr(os, "O_DIRECT") else None
_MAP_FAILED = ctypes.c_void_p(-1).value


class AlignedBuffer:
    """Page-aligned memory (an anonymous mapping) that grows on demand and is reused: the same
    pages for every read, so they are faulted in once."""

    def __init__(self):
        self._map: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        """At least `nbytes`, page-aligned; what an earlier `get` returned may be replaced."""
        if self._map is None or len(self._map) < nbytes:
            self._map = mmap.mmap(-1, max(_PAGE, -(-nbytes // _PAGE) * _PAGE))
        return self._map


class DirectFile:
    """One shard, open for `O_DIRECT` reads (and plainly, for what the page cache holds)."""

    def __init__(self, path: str, direct_fd: int):
        self.path = path
        self.direct_fd = direct_fd
        self.plain_only = False  # set when O_DIRECT reads fail with EINVAL
        self.plain_fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.plain_fd).st_size
        # a shared read-only mapping, for mincore only: never touched, so it reads nothing and
        # costs no memory (not even commit charge)
        self._address = None
        if self.size:
            address = _LIBC[0](None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, self.plain_fd, 0)
            self._address = None if address in (None, _MAP_FAILED) else address

    @classmethod
    def open(cls, path: str) -> DirectFile | None:
        """The shard for direct reads, or None where this file system or platform has none."""
        if _LIBC is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # EINVAL: no O_DIRECT here (tmpfs); other errors: the plain reader reports them
            return None
        try:
            return cls(path, fd)
        except OSError:
            os.close(fd)
            return None

    def close(self) -> None:
        if self._address is not None:
            _LIBC[1](self._address, self.size)
            self._address = None
        for fd in (self.direct_fd, self.plain_fd):
            os.close(fd)

    def resident(self, start: int, end: int) -> bool:
        """Whether the page cache holds every page of bytes [start, end). (The kernel answers for
        files this user owns or may write; for others it sees no page cache, and we read from the
        disk: correct, only without the cache's help.)"""
        if end <= start:
            return True
        if self._address is None:
            return False
        first, last = start // _PAGE, -(-min(end, self.size) // _PAGE)
        pages = (ctypes.c_ubyte * (last - first))()
        if _LIBC[2](self._address + first * _PAGE, (last - first) * _PAGE, pages) != 0:
            return False  # cannot tell: read from the disk
        return 0 not in bytes(pages)  # bit 0: resident; the others are reserved (zero)

    def read(self, start: int, nbytes: int, buffer: AlignedBuffer) -> tuple[mmap.mmap, int]:
        """Bytes [start, start + nbytes) of the file, read into `buffer`: returns its memory and
        where in it they begin. From the page cache when it holds them all, else with O_DIRECT
        over the aligned range around them. Raises EOFError when the file ends before them."""
        first = start // ALIGN * ALIGN
        last = -(-(start + nbytes) // ALIGN) * ALIGN
        memory = buffer.get(last - first)
        view = memoryview(memory)
        try:
            if not (self.plain_only or self.resident(start, start + nbytes)):
                try:  # the aligned range may pass the end of the file: a short read there is expected
                    done = _read_fully(self.direct_fd, view[: last - first], first, stop_at_eof=True)
                except OSError as error:
                    if error.errno != errno.EINVAL:
                        raise
                    # a device whose blocks are larger than ALIGN, or a file system that takes the
                    # flag but not the reads: plain reads from now on
                    self.plain_only = True
                else:
                    if done < start + nbytes - first:
                        raise EOFError(f"{self.path} ends at byte {first + done}, before byte {start + nbytes}")
                    return memory, start - first
            _read_fully(self.plain_fd, view[start - first : start - first + nbytes], start)
        finally:
            view.release()
        return memory, start - first


def _read_fully(fd: int, view: memoryview, offset: int, stop_at_eof: bool = False) -> int:
    """Reads len(view) bytes at `offset`, or with `stop_at_eof` up to the end of the file: returns
    how many. (An O_DIRECT read that stops short of an aligned size has met the end of the file:
    the next read would start unaligned.)"""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        done += count
        if count == 0 or (stop_at_eof and done < len(view) and done % ALIGN):
            if stop_at_eof:
                return done
            raise EOFError(f"file ends at byte {offset + done}")
    return done
