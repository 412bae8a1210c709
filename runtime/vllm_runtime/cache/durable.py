"""Getting cached bytes onto the disk before the manifest says they are there.

A warm start checks only the manifest (``manifest.py``). Were the manifest on the disk before the weights it
vouches for, a node that loses power could restart "warm" on truncated or zeroed files. So every verified
file is fsynced, and then the folders that name them, before the manifest is written (``make_durable``).

Left to itself the kernel writes dirty pages back only after 30 s or once they pass a tenth of memory: a
model smaller than that would all be written at the final fsync, after the download. ``Writeback`` asks
the kernel to start writing each stretch of a file as soon as it has landed (``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``: it queues the I/O and returns), so the disk works while the network does and the
fsync finds little left. Where the call is missing (not Linux, no glibc), only the fsyncs remain.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, do not wait
WRITEBACK_BYTES = 16 * 1024 * 1024  # ask once per this many bytes landed


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to the disk; False if it cannot."""
    if _sync_file_range is None:
        return False
    # A refusal (EINVAL on a filesystem without it, say) costs only the early start: the fsync still comes.
    return _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


class Writeback:
    """Starts the writeback of a file being written, one ``WRITEBACK_BYTES`` stretch at a time."""

    def __init__(self, fd: int, every: int | None = None):
        self.fd = fd
        self.every = every or WRITEBACK_BYTES
        self.started = 0  # bytes [0, started) already handed to the kernel

    def landed(self, end: int) -> None:
        """Bytes [0, ``end``) of the file are written."""
        if end - self.started >= self.every and start_writeback(self.fd, self.started, end - self.started):
            self.started = end


def fsync_path(path: Path) -> None:
    """fsync a file (through a link: the file it names) or a folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(dirs: Iterable[Path]) -> None:
    """fsync ``dirs``, the folders naming the cached files (each file is fsynced once fetched), in order."""
    for directory in dict.fromkeys(dirs):  # each once, in the order given
        fsync_path(directory)
