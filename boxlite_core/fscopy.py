"""Copy files and trees without ever reading a special file as data.

Why: ``shutil.copytree`` copies a character device by *reading* it. The guest kit's base root
holds real device nodes (``dev/full``, ``dev/zero``, ``dev/urandom``); copying it read
``dev/full`` as a file and wrote 78 GB until the disk was full (finding 9). Here:

* regular files are copied (or hard-linked) and symlinks recreated, never followed;
* character/block device nodes are recreated as nodes (``mknod``, root only) or skipped;
* FIFOs and sockets are never opened: a FIFO would block the copy forever, and neither holds
  data worth copying. In a tree they are skipped and reported; as a single source they are
  refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import attrs

from .errors import ConfigError

log = logging.getLogger(__name__)


@attrs.define
class CopyReport:
    """What a tree copy did with the entries that are not plain files, dirs or symlinks."""

    nodes: list[str] = attrs.field(factory=list)  #: device nodes recreated as nodes
    skipped: list[str] = attrs.field(factory=list)  #: special files not copied, with why


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def open_regular(path: str | os.PathLike[str], what: str):  # -> BinaryIO
    """Open ``path`` for reading only if it is a regular file (after following symlinks).

    Checked on the open descriptor (``O_NONBLOCK`` so a FIFO cannot block the open itself),
    so a path swapped for a device between a check and the open is still refused.
    Raises ConfigError naming the path and its kind otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"{what}: {path} is a {_kind(st.st_mode)}, not a regular file; boxlite never "
                "reads special files as data — give it a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], what: str = "copy",
              *, preserve: bool = True) -> None:
    """Copy one regular file (contents, and mode/times when ``preserve``); ConfigError for a
    device node, FIFO or socket instead of reading it."""
    with open_regular(src, what) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
    if preserve:
        shutil.copystat(src, dst)


def _copy_special(src: Path, dst: Path, st: os.stat_result, rel: str,
                  report: CopyReport) -> None:
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        try:
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            os.mknod(dst, st.st_mode, st.st_rdev)
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(dst, stat.S_IMODE(st.st_mode))  # mknod's mode went through the umask
            report.nodes.append(rel)
        except PermissionError:
            report.skipped.append(f"{rel} ({_kind(st.st_mode)}: mknod needs root)")
        return
    report.skipped.append(f"{rel} ({_kind(st.st_mode)}: never read)")


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
              link: bool = False, dirs_exist_ok: bool = False,
              on_file: Callable[[Path, Path], None] | None = None) -> CopyReport:
    """Copy the tree ``src`` to ``dst``: dirs, regular files, symlinks (as links), device nodes
    (as nodes, or skipped without root); FIFOs and sockets skipped. Never reads a special file.

    ``link``: hard-link regular files instead of copying them (same filesystem, faster).
    ``on_file(src, dst)``: replaces the regular-file copy (e.g. a space-checking one).
    Returns a CopyReport of nodes made and entries skipped; skips are logged at INFO.
    """
    src, dst = Path(src), Path(dst)
    report = CopyReport()
    dst.mkdir(parents=True, exist_ok=dirs_exist_ok)
    dir_stats: list[tuple[Path, os.stat_result]] = [(dst, os.lstat(src))]
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        out_dir = dst / here.relative_to(src)
        for name in sorted(dirnames + filenames):
            s = here / name
            d = out_dir / name
            rel = str(s.relative_to(src))
            st = os.lstat(s)
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                if d.is_symlink() or d.is_file():
                    d.unlink()
                os.symlink(os.readlink(s), d)
                with _suppress_perm():
                    os.lchown(d, st.st_uid, st.st_gid)
            elif stat.S_ISDIR(mode):
                d.mkdir(exist_ok=True)
                dir_stats.append((d, st))
            elif stat.S_ISREG(mode):
                if d.is_symlink():
                    d.unlink()
                if link:
                    if d.exists():
                        d.unlink()
                    os.link(s, d)
                elif on_file is not None:
                    on_file(s, d)
                else:
                    copy_file(s, d, rel)
                    with _suppress_perm():
                        os.chown(d, st.st_uid, st.st_gid)
            else:
                _copy_special(s, d, st, rel, report)
        # os.walk lists symlinks to dirs in dirnames but does not descend: handled above
    for d, st in reversed(dir_stats):
        with _suppress_perm():
            os.chown(d, st.st_uid, st.st_gid)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    if report.skipped:
        log.info("copy %s -> %s: skipped %d special file(s): %s", src, dst,
                 len(report.skipped), ", ".join(report.skipped[:5]))
    return report


class _suppress_perm:
    """chown as non-root fails for foreign owners: keep going, the copy is still useful."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, PermissionError)
