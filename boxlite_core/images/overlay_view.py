"""Looking paths up in a stack of layer directories the way overlayfs shows them merged.

The ``layers`` rootfs strategy unpacks each layer into a directory of its own and the guest
stacks them with overlayfs. For that stack to show exactly what applying the layers one on top
of the other shows (the ``disk`` and ``merged`` strategies), unpacking a layer must see the
layers below it: a path on the way may be a symlink only a lower layer has, a hardlink may
name a file only a lower layer has, a missing parent directory must take the owner and mode
of the one below. So the unpacker looks paths up through a :class:`LayerView`: the layer being
written on top, then the lower layers, with overlayfs' rules
(Linux Documentation/filesystems/overlayfs.rst, "whiteouts and opaque directories"):

* the topmost entry wins; a directory merges with the directories below it, until one of
  them is opaque or a lower entry is not a directory;
* a whiteout — a char device 0/0 — hides what is below it;
* a layer whose root directory is opaque hides every layer below it. overlayfs itself ignores
  the mark on a root (its root is always merged), so the ``layers`` strategy leaves those
  layers out of the stack (:func:`visible_layers`).

Opaque directories carry ``user.overlay.opaque=y``: the guest mounts with ``userxattr``
(Linux >= 5.11), because ``trusted.*`` xattrs do not reach its overlayfs through virtiofs or 9p.

A view of one directory with ``overlay=False`` is plain chroot-style resolution (no
whiteouts, no opaque marks): what :func:`.layers.resolve_in_root` uses.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs

from ..errors import ImageError

#: overlayfs' xattr namespace under ``userxattr``; a layer may not set names in it
OVERLAY_XATTR_PREFIX = "user.overlay."
OVERLAY_OPAQUE_XATTR = OVERLAY_XATTR_PREFIX + "opaque"
#: symlinks followed resolving one path (the kernel's limit, 40)
MAX_LINK_HOPS = 40


def is_whiteout(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a char device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | Path) -> bool:
    """Whether the directory at ``path`` carries ``user.overlay.opaque=y``."""
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def visible_layers(dirs: Sequence[Path]) -> list[Path]:
    """The layer directories (bottom first) overlayfs must stack: those from the topmost
    one whose root is opaque upwards (the layers below it are hidden whole)."""
    first = max((i for i, d in enumerate(dirs) if is_opaque(d)), default=0)
    return list(dirs[first:])


@attrs.frozen
class Entry:
    """What a path shows: the host path of the topmost entry and its lstat."""

    layer: int
    path: str
    st: os.stat_result


@attrs.frozen
class LayerView:
    """``roots``: layer directories, topmost first. ``overlay``: whiteouts and opaque marks
    count (False: one plain directory)."""

    roots: tuple[str, ...]
    overlay: bool = True

    def _root_layers(self, start: int) -> tuple[int, ...]:
        out = []
        for i in range(start, len(self.roots)):
            out.append(i)
            if self.overlay and is_opaque(self.roots[i]):
                break
        return tuple(out)

    def _step(
        self, layers: tuple[int, ...], parts: list[str]
    ) -> tuple[Entry | None, tuple[int, ...]]:
        """Look up ``parts`` given the ``layers`` merged at its parent directory; return the
        entry shown and the layers merged at it (when it is a directory)."""
        found: Entry | None = None
        merged: list[int] = []
        for i in layers:
            path = os.path.join(self.roots[i], *parts)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if found is None:
                if self.overlay and is_whiteout(st):
                    return None, ()
                found = Entry(i, path, st)
                if not stat.S_ISDIR(st.st_mode):
                    return found, ()
            elif not stat.S_ISDIR(st.st_mode):
                break  # a lower non-directory (or whiteout) ends the merge
            merged.append(i)
            if self.overlay and is_opaque(path):
                break
        return found, tuple(merged)

    def lookup(self, parts: Sequence[str], *, start: int = 0) -> Entry | None:
        """The entry ``parts`` (real components: no symlink on the way) shows, or None.
        ``start``: ignore the layers above this index (1: the lower layers only)."""
        layers = self._root_layers(start)
        entry = None
        for depth in range(len(parts)):
            entry, layers = self._step(layers, list(parts[: depth + 1]))
            if entry is None:
                return None
        return entry

    def resolve(self, parts: Sequence[str], *, follow_last: bool) -> list[str]:
        """Resolve ``parts`` with chroot semantics; return real components.

        Every symlink met on the way (the last one only when ``follow_last``) is replaced by
        its target, read as if the view's root were '/': an absolute target restarts at the
        root, ``..`` stops there. The result names a path whose parents, where they exist,
        are directories in the view.

        Raises:
            ImageError: more than :data:`MAX_LINK_HOPS` symlinks (a loop).
        """
        root = self._root_layers(0)
        todo = list(parts)
        done: list[str] = []
        merged = [root]  # merged[k]: the layers merged at done[:k]
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                    merged.pop()
                continue
            entry, below = self._step(merged[-1], [*done, part])
            is_link = entry is not None and stat.S_ISLNK(entry.st.st_mode)
            if is_link and (follow_last or todo):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise ImageError(f"too many levels of symlinks resolving {'/'.join(parts)!r}")
                assert entry is not None
                link = os.readlink(entry.path)
                if link.startswith("/"):
                    done, merged = [], [root]
                todo = link.split("/") + todo
                continue
            done.append(part)
            merged.append(below)
        return done
