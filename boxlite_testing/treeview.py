"""What a directory tree shows, entry by entry, and a real overlayfs mount of layer dirs.

``tree_view`` writes each entry as ``boxlite_conformance.layered_image.LISTING_SCRIPT`` does
in the guest (``TYPE|MODE|UID|GID`` + ``|NLINK|SIZE|MD5`` for files, ``|TARGET`` for
symlinks), so a view read on the host compares with one read in a box. ``overlay_mounted``
stacks layer directories with the host kernel's overlayfs, mounted as the guest agent mounts
them (``userxattr``): the host tests check the ``layers`` strategy's directories through the
same filesystem the guest uses, without booting one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from boxlite_core.agent.container import overlay_options
from boxlite_core.images.overlay_view import visible_layers


def _walk(root: Path, tops: Iterable[str] | None) -> Iterator[tuple[str, str]]:
    """(relative path, host path) of every entry under ``root`` (or its ``tops``)."""
    names = sorted(tops) if tops is not None else sorted(os.listdir(root))
    for top in names:
        if not os.path.lexists(root / top):
            continue
        yield top, str(root / top)
        if os.path.isdir(root / top) and not os.path.islink(root / top):
            for dirpath, dirs, files in os.walk(root / top):
                dirs.sort()
                for name in sorted(dirs + files):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, root), path


def entry_line(path: str) -> str:
    st = os.lstat(path)
    ids = f"{st.st_uid}|{st.st_gid}"
    mode = format(stat.S_IMODE(st.st_mode), "o")
    if stat.S_ISDIR(st.st_mode):
        return f"dir|{mode}|{ids}"
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            digest = hashlib.md5(fh.read()).hexdigest()
        return f"file|{mode}|{ids}|{st.st_nlink}|{st.st_size}|{digest}"
    if stat.S_ISLNK(st.st_mode):
        return f"symlink|-|{ids}|{os.readlink(path)}"
    return f"other|{stat.filemode(st.st_mode)}|{ids}|{st.st_rdev}"


def tree_view(root: Path, tops: Iterable[str] | None = None) -> dict[str, str]:
    """{relative path: entry line} for every entry under ``root`` (only ``tops`` if given)."""
    return {rel: entry_line(path) for rel, path in _walk(Path(root), tops)}


def tree_xattrs(root: Path, tops: Iterable[str] | None = None) -> dict[str, dict[str, bytes]]:
    """{relative path: {name: value}} of the ``user.*`` xattrs under ``root``."""
    out: dict[str, dict[str, bytes]] = {}
    for rel, path in _walk(Path(root), tops):
        if os.path.islink(path):
            continue
        names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
        if names:
            out[rel] = {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}
    return out


def overlay_unavailable(work: Path) -> str | None:
    """None when this host can mount overlayfs with ``userxattr`` here, else why not."""
    if os.geteuid() != 0:
        return "mounting overlayfs needs root"
    lower, mnt = work / "probe-lower", work / "probe-mnt"
    for d in (lower / "a", lower / "b", mnt):
        d.mkdir(parents=True, exist_ok=True)
    try:
        with overlay_mounted([lower / "a", lower / "b"], work / "probe"):
            return None
    except subprocess.CalledProcessError as exc:
        return f"mount -t overlay failed: {exc.stderr.decode(errors='replace').strip()}"


@contextlib.contextmanager
def overlay_mounted(dirs: list[Path], work: Path) -> Iterator[Path]:
    """Mount ``dirs`` (layer directories, bottom first) with the guest agent's overlayfs
    options (``overlay_options``) over a fresh upper dir in ``work``, the layers an opaque
    root hides left out as the ``layers`` strategy does. Yields the mount point; always
    unmounted."""
    mnt = work / "mnt"
    for d in (work / "upper", work / "work", mnt):
        d.mkdir(parents=True, exist_ok=True)
    options = overlay_options([str(d) for d in visible_layers(dirs)], str(work))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=30)
