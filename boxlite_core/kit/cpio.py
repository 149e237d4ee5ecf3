"""A tiny writer for the cpio "newc" format the kernel unpacks as an initramfs.

Why our own: the kernel only needs newc (magic 070701), and writing it in Python keeps the
initramfs build free of a host `cpio` binary and makes the archive reproducible (fixed mtimes,
inode numbers assigned in order, entries in the order we add them).

The archive is written uncompressed: measured under TCG (median of 5, launch → marker),
gzip -1 (2.3 MiB) 2.02 s vs uncompressed (6.2 MiB) 2.04 s — no difference, so we skip the
compression step and keep the archive inspectable with any cpio.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"


class CpioWriter:
    """Write entries to a newc archive; call close() (or use as a context manager) to finish.

    Parent directories must be added before their children, as the kernel creates entries in
    archive order.
    """

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._ino = 0
        self._mtime = mtime
        self._closed = False
        self.names: list[str] = []

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        name = name.strip("/") or "."
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            uid,
            gid,
            nlink,
            self._mtime,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (unused in newc)
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._pad(len(header) + len(encoded))
        self._out.write(data)
        self._pad(len(data))
        if name != "TRAILER!!!":
            self.names.append(name)

    def _pad(self, length: int) -> None:
        rem = length % 4
        if rem:
            self._out.write(b"\0" * (4 - rem))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_path(self, name: str, source: Path, perm: int | None = None) -> None:
        """Add a host file's content; permissions from the host file unless given."""
        mode = source.stat().st_mode
        self.add_file(name, source.read_bytes(), stat.S_IMODE(mode) if perm is None else perm)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._entry("TRAILER!!!", 0, nlink=1)
            self._closed = True
