"""Copy-out, host side: guest tar stream -> private staging dir -> destination.

Why staging outside the destination: the destination may be guest-writable (a rw volume); a
staging directory inside it (what copy-out used to do) is a place the guest can race. The
staging directory lives under the runtime home (``HOME/tmp``, 0700), is made with mkdtemp
(0700, ours) and is removed whatever happens, so a refused or failed copy leaves nothing at
the destination.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import attrs

from ..errors import ConfigError
from .place import place, remove_tree, shown
from .request import OutRequest
from .untar import ENTRY_OVERHEAD, RESULT, unpack


class SpecialBitsStripped(UserWarning):
    """Copy-out dropped setuid/setgid/sticky bits from files (a guest's setuid binary must
    not become a setuid binary on the host)."""


@attrs.frozen
class CopyOutResult:
    """``path``: the host path written; ``kind``: "dir", "file", "symlink" or "fifo";
    ``entries``: archive members written; ``data_bytes``: file bytes; ``stripped``: archive
    names whose setuid/setgid/sticky bits were dropped."""

    path: Path
    kind: str
    entries: int
    data_bytes: int
    stripped: tuple[str, ...]


def staging_root(home: str | os.PathLike[str]) -> Path:
    """``home``/tmp, created 0700; refused if it is a symlink or not ours (ConfigError)."""
    root = Path(home) / "tmp"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(
            f"copy: staging directory {root} is not a directory owned by this user; remove it"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(root, 0o700)
    return root


def check_destination(dest: str | os.PathLike[str]) -> None:
    """Fail early (before any download) when the destination's parent does not exist."""
    text = os.fspath(dest)
    trimmed = text.rstrip("/") or "/"
    parent = os.path.dirname(trimmed) or "."
    if os.path.basename(trimmed) in (".", ".."):
        parent = trimmed
    if not os.path.isdir(parent):
        raise ConfigError(f"copy: host directory {parent} does not exist; create it first")


def remove_staging(path: str) -> None:
    """Remove a staging directory whatever modes the guest gave the directories in it (a
    0555 one cannot be emptied by a non-root user: a refused copy left the whole staged tree
    under ``HOME/tmp``); see :func:`.place.remove_tree`."""
    parent = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree(parent, os.path.basename(path))
    finally:
        os.close(parent)


def receive_tree(chunks: Iterable[bytes], request: OutRequest, dest: str | os.PathLike[str],
                 *, staging: str | os.PathLike[str] | None = None) -> CopyOutResult:
    """Unpack the guest's tar stream ``chunks`` for ``request`` and place it at ``dest``.

    ``staging``: the directory that holds the private staging dir (default: tempfile's).
    Raises ArchiveRefused (GuestError) for a hostile or broken archive, ConfigError for a
    destination that cannot take the result, DiskSpaceError when it would not fit; errors of
    the chunk iterator (the download) pass through. Warns SpecialBitsStripped when
    setuid/setgid/sticky bits were dropped from files.
    """
    check_destination(dest)
    tmp = tempfile.mkdtemp(prefix="copy-out-", dir=staging)
    try:
        stage_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            unpacked = unpack(chunks, stage_fd, request.name, stage_path=tmp)
            path = place(stage_fd, RESULT, unpacked.kind, dest,
                         name=request.name, contents=request.contents,
                         need_bytes=unpacked.data_bytes + unpacked.entries * ENTRY_OVERHEAD,
                         need_inodes=unpacked.entries)
        finally:
            os.close(stage_fd)
    finally:
        remove_staging(tmp)
    if unpacked.stripped:
        names = ", ".join(shown(name) for name in unpacked.stripped[:5])  # guest's names
        more = f" and {len(unpacked.stripped) - 5} more" if len(unpacked.stripped) > 5 else ""
        warnings.warn(
            f"copy-out of {shown(request.guest_path)}: setuid/setgid/sticky bits dropped from "
            f"{names}{more}",
            SpecialBitsStripped,
            stacklevel=2,
        )
    return CopyOutResult(path=path, kind=unpacked.kind, entries=unpacked.entries,
                         data_bytes=unpacked.data_bytes, stripped=unpacked.stripped)


__all__ = ["CopyOutResult", "SpecialBitsStripped", "check_destination", "receive_tree",
           "remove_staging", "staging_root"]
