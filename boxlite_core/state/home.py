"""The runtime's home directory is private: 0700, and the files boxlite keeps there 0600.

Why: ``boxlite.db`` holds each box's options, ``-e`` values included (API tokens, passwords).
A home created 0755 with a 0644 database let any local user read them. Two layers:

* the home itself is 0700, so nobody else can even traverse into it — this alone protects
  every file below, whatever its own mode;
* the files boxlite writes for itself (the database and its ``-wal``/``-shm``, lock files,
  records, sockets) are 0600 and its bookkeeping directories 0700, so copying or bind-mounting
  a subtree elsewhere does not leak them either.

What is *not* touched: the content trees below ``boxes/*/`` and ``cache/`` (a ``merged``
rootfs, unpacked layers). Their modes belong to the guest's files (``/tmp`` is 1777,
``/usr/bin/*`` 0755); rewriting them would break the container, and the 0700 home already
keeps other users out.

No process-wide umask: boxlite is embedded in other programs, whose umask is theirs.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

#: not under "boxlite_core": the CLI silences that tree, but this notice must reach a terminal
log = logging.getLogger("boxlite.home")

HOME_MODE = 0o700
FILE_MODE = 0o600
#: bookkeeping directories directly under the home, tightened to 0700
PRIVATE_DIRS = ("boxes", "locks", "images", "cache", "tmp")
#: files directly in a box directory that boxlite writes (records, sockets, logs)
_BOX_FILE_SUFFIXES = (".json", ".sock", ".log", ".lock", ".pid", ".tmp")

_notified: set[str] = set()
_lock = threading.Lock()


def _tighten(path: Path, mode: int, changed: list[str]) -> None:
    """Clear group/other bits (and set ``mode``'s owner bits) on one path we own; never follows
    a symlink, never raises (a file that vanished or belongs to someone else is left alone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    current = stat.S_IMODE(st.st_mode)
    wanted = (current & ~0o077) | (mode & 0o700)
    if current != wanted:
        try:
            os.chmod(path, wanted)
        except OSError:
            return
        changed.append(f"{path.name} {current:04o}->{wanted:04o}")


def secure_home(home: Path) -> list[str]:
    """Create ``home`` and its bookkeeping dirs 0700, or tighten them; returns what changed.

    An existing home that others could read is tightened (home 0700; the database, its
    ``-wal``/``-shm``, lock files and box records 0600; bookkeeping dirs 0700) with one WARNING
    per home per process: the user should know their secrets were exposed until now.
    """
    home = Path(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        home.mkdir(mode=HOME_MODE)
    except FileExistsError:
        pass
    changed: list[str] = []
    _tighten(home, HOME_MODE, changed)
    for name in PRIVATE_DIRS:
        try:
            (home / name).mkdir(mode=HOME_MODE)  # before anything mkdirs it with the umask
        except FileExistsError:
            _tighten(home / name, HOME_MODE, changed)
    for db in home.glob("boxlite.db*"):
        _tighten(db, FILE_MODE, changed)
    if changed:
        # a legacy home: walk what older versions left loose (locks, box records, sockets);
        # a home that was already private is not walked (this runs on every Runtime())
        for entry in _iter_private_files(home):
            _tighten(entry, FILE_MODE, changed)
        key = str(home.resolve())
        with _lock:
            first = key not in _notified
            _notified.add(key)
        if first:
            log.warning(
                "boxlite home %s was readable by other users (it holds -e secrets); "
                "made it private: %s", home, ", ".join(changed[:6])
                + (f" and {len(changed) - 6} more" if len(changed) > 6 else ""))
    return changed


def _iter_private_files(home: Path) -> Iterator[Path]:
    """The files boxlite itself writes: db files, lock files, per-box records and sockets."""
    yield from home.glob("boxlite.db*")
    locks = home / "locks"
    if locks.is_dir():
        yield from (p for p in locks.iterdir() if not p.is_symlink())
    boxes = home / "boxes"
    if boxes.is_dir():
        for box in boxes.iterdir():
            if box.is_symlink() or not box.is_dir():
                continue
            yield box  # dirs get 0700 through the same "clear group/other" rule
            for item in box.iterdir():
                if item.name.endswith(_BOX_FILE_SUFFIXES) and not item.is_symlink():
                    yield item


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing (before sqlite opens it: sqlite gives
    the ``-wal``/``-shm`` files the database file's permissions).

    An existing file is never opened here: closing *any* descriptor of a file drops every
    POSIX lock this process holds on it, so an open()+close() of a database another
    connection in this process is using silently releases sqlite's locks; another process
    then believes it is the last user and deletes the ``-shm`` under it ("disk I/O error",
    and a risk to the data)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
