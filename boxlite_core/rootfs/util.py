"""Helpers the built-in rootfs strategies share: cache locks, ext4 images, atomic dirs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..tools import require_tool, run

MIB = 1024 * 1024
#: smallest ext4 image we make: room for the journal and a box's first writes
MIN_DISK_MIB = 64


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive cross-process lock on ``path`` (created if needed).

    Why: two boxes of one image starting at once must not both build the cached base;
    the second waits and then finds it ready.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) of a directory tree, not following symlinks."""
    total = 0
    inodes = 1
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            # round each file up to a 4 KiB block, as ext4 stores it
            total += (st.st_size + 4095) // 4096 * 4096
    return total, inodes


def ext4_size_for(content_bytes: int, inodes: int, min_mib: int = MIN_DISK_MIB) -> int:
    """Image size in bytes: content + 25% + 32 MiB slack (metadata, journal, box writes)."""
    size = content_bytes + content_bytes // 4 + 32 * MIB + inodes * 256
    size = max(size, min_mib * MIB)
    return (size + MIB - 1) // MIB * MIB


def make_ext4(
    image: Path, source: Path | None, size_bytes: int, *, label: str, inodes: int = 0
) -> None:
    """Create a sparse raw ext4 image at ``image``, populated from ``source`` if given.

    ``mkfs.ext4 -d`` copies owners, modes, symlinks, device nodes and xattrs from the
    directory, so a rootfs unpacked as root keeps its numeric ownership without mounting.
    """
    mkfs = require_tool("mkfs.ext4", why="build the ext4 rootfs image")
    with open(image, "wb") as fh:
        fh.truncate(size_bytes)
    argv = [mkfs, "-q", "-F", "-t", "ext4", "-L", label, "-m", "0", "-b", "4096"]
    if inodes:
        argv += ["-N", str(inodes)]
    if source is not None:
        argv += ["-d", source]
    if os.geteuid() != 0:
        # unprivileged: files belong to the caller; at least make '/' root's in the guest
        argv += ["-E", "root_owner=0:0"]
    argv.append(image)
    run(argv, timeout=1800)


@contextlib.contextmanager
def temp_dir_in(parent: Path, prefix: str) -> Iterator[Path]:
    """A temp dir next to the final location (same fs, so rename is atomic); always removed."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
