"""A path inside the container's root, resolved the way the container itself would see it.

Why: an image's paths go through symlinks (``/var/run -> /run``, ``/lib -> usr/lib``), and a
volume target or a working directory named through one must land where a process in the
container would land, never outside the root. Resolution follows chroot semantics, component
by component, as moby's ``FollowSymlinkInScope`` and cyphar's filepath-securejoin do: an
absolute link target restarts at the container's root, ``..`` stops at the root, at most
:data:`MAXSYMLINKS` links are followed (Linux's own limit, fs/namei.c) before ELOOP. Missing
components can be created on the way (``mkdir -p`` inside the root, as runc does for the
working directory and for mount targets).

Runs in the agent (guest side): only the guest sees the container's real root, whatever the
rootfs strategy (a disk image, a shared directory, overlayfs). Also safe in the forked exec
stages (procs.py): plain ``os`` calls only, no locks, no logging.
"""

from __future__ import annotations

import errno
import os
import stat

#: symlinks followed in one resolution before ELOOP (Linux: MAXSYMLINKS in fs/namei.c)
MAXSYMLINKS = 40


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def normal(path: str) -> str:
    """``path`` as an absolute container path without empty or '.' components (no link is
    followed, '..' is kept): what :func:`in_container` of an unchanged path gives back."""
    return "/" + "/".join(_components(path))


def resolve(root: str, path: str, *, create: bool = False,
            mode: int = 0o755) -> tuple[str, list[str]]:
    """``path`` inside ``root`` (a host-side directory standing for the container's ``/``),
    every symlink followed within ``root``; the result names a directory.

    ``create``: make missing components (``mode``, owned by the caller) instead of failing.
    Returns (the real path under ``root``, the paths created, outermost first). A relative
    ``path`` is taken from the root.

    Raises:
        FileNotFoundError: a component is missing (without ``create``).
        NotADirectoryError: a component, or the result, exists and is not a directory
            (e.g. a file, or a link to one); ``filename`` is its path in the container.
        OSError: ELOOP after :data:`MAXSYMLINKS` links (a link cycle); others from mkdir
            (EROFS on a read-only root, EACCES...).
    """
    root = root.rstrip("/") or "/"
    todo = _components(path)
    todo.reverse()  # a stack: the next component last
    done: list[str] = []  # resolved components, no symlink among them
    created: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()  # `..` of the root is the root
            continue
        where = "/" + "/".join([*done, part])
        full = os.path.join(root, *done, part)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if not create:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where) from None
            try:
                os.mkdir(full, mode)
            except FileExistsError:  # made meanwhile: look again
                todo.append(part)
                continue
            created.append(full)
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAXSYMLINKS:
                raise OSError(errno.ELOOP, f"more than {MAXSYMLINKS} symbolic links on the way "
                              "(a link cycle?)", where)
            target = os.readlink(full)
            if target.startswith("/"):
                done = []  # an absolute link restarts at the container's root
            todo.extend(reversed(_components(target)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", where)
        done.append(part)
    return os.path.join(root, *done), created


def in_container(root: str, real: str) -> str:
    """The container's name for ``real``, a path :func:`resolve` returned: '/…'."""
    root = root.rstrip("/") or "/"
    rest = real[len(root):] if root != "/" else real
    return "/" + rest.strip("/")


def describe(exc: OSError, asked: str) -> str:
    """One line for an error of :func:`resolve` on ``asked``: why, and where in the container
    when that is not ``asked`` itself (a link led elsewhere)."""
    reason = exc.strerror or str(exc)
    where = exc.filename
    if where and where != normal(asked):
        return f"{reason} (at {where} in the container)"
    return reason
