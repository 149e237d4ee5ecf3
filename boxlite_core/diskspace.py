"""Free space is checked before a long write into the home, and while a stream of unknown size
is written: boxlite stops with a clear error instead of filling the disk.

Why: a full disk breaks more than boxlite (sqlite, the user's other programs, logs), and a
write that fails half-way at ENOSPC leaves a truncated blob or image behind. One helper, so
every long writer (image import, registry pull, ext4 base, qemu-img, guest kit build, copy-out
staging) fails the same way: naming the path, what it needs, what is free and the fix.

A reserve (``BOXLITE_DISK_RESERVE_MIB``, default 256 MiB) is always left free on top of the
need: boxlite itself needs room for its database and logs after the write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from . import envvars
from .errors import EngineError

MIB = 1024 * 1024
GIB = 1024 * MIB
ENV_RESERVE = "BOXLITE_DISK_RESERVE_MIB"
DEFAULT_RESERVE_MIB = 256
#: a stream of unknown size re-checks the free space after this many bytes
CHECK_EVERY = 32 * MIB


class DiskSpaceError(EngineError):
    """Not enough free space for a write boxlite was about to do (nothing was written)."""


def reserve_bytes() -> int:
    """Bytes always left free (``BOXLITE_DISK_RESERVE_MIB``; 0 disables the margin)."""
    return envvars.mebibytes(ENV_RESERVE, DEFAULT_RESERVE_MIB) * MIB


def _existing(path: Path) -> Path:
    """The nearest existing ancestor: statvfs needs a path that exists."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(_existing(Path(path)))
    return st.f_bavail * st.f_frsize


def _human(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def _error(path: Path, need: int, free: int, what: str) -> DiskSpaceError:
    return DiskSpaceError(
        f"not enough disk space for {what} under {path}: needs {_human(need)} "
        f"(+{_human(reserve_bytes())} reserve), {_human(free)} free; free space on that "
        f"filesystem (`boxlite image prune`, remove unused boxes) or set BOXLITE_HOME to a "
        f"larger one")


def ensure_free(path: str | os.PathLike[str], need_bytes: int, what: str) -> None:
    """Raise DiskSpaceError unless ``need_bytes`` + the reserve are free where ``path`` lives.

    ``path``: the file or directory about to be written (need not exist yet).
    ``need_bytes``: an upper estimate of what the write adds, in bytes.
    ``what``: the operation, for the message ("ext4 base for image sha256:…").
    """
    path = Path(path)
    free = free_bytes(path)
    if free < need_bytes + reserve_bytes():
        raise _error(path, need_bytes, free, what)


class GuardedWriter:
    """A file wrapper for streams of unknown size: every ``CHECK_EVERY`` bytes it checks that
    the next stretch still fits (plus the reserve) and raises DiskSpaceError before it would
    not. The caller deletes its temp file on the error (they all write temp-then-rename).
    """

    def __init__(self, fh: BinaryIO, path: str | os.PathLike[str], what: str,
                 *, check_every: int = CHECK_EVERY) -> None:
        self._fh = fh
        self._path = Path(path)
        self._what = what
        self._every = check_every
        self._since = check_every  # check before the first byte
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if self._since + n > self._every:
            free = free_bytes(self._path)
            if free < max(n, self._every) + reserve_bytes():
                raise _error(self._path, self.written + max(n, self._every), free + self.written,
                             self._what)
            self._since = 0
        self._fh.write(data)
        self._since += n
        self.written += n
        return n

    def __getattr__(self, name: str):  # flush, fileno, close, ... go to the real file
        return getattr(self._fh, name)


def copy_stream(src: BinaryIO, dst: BinaryIO, path: str | os.PathLike[str], what: str,
                chunk: int = MIB) -> int:
    """Copy ``src`` to ``dst`` (a file at ``path``) checking the space as it goes; bytes copied."""
    guarded = GuardedWriter(dst, path, what)
    while data := src.read(chunk):
        guarded.write(data)
    return guarded.written


__all__ = ["DiskSpaceError", "GuardedWriter", "copy_stream", "ensure_free", "free_bytes",
           "reserve_bytes"]
