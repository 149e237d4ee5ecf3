"""Move a staged copy-out result into the destination without following a link there.

Why: the destination may be a directory the guest can write (a rw volume). The guest can plant
``d -> /somewhere`` where the copy will land, or swap a directory for a link while we copy.
Rules, all fd-relative:

* the user's path *up to* the destination's parent is resolved as typed (their ``/home``
  symlink is theirs); from the destination down, no symlink is ever followed: directories
  are opened with ``O_NOFOLLOW | O_DIRECTORY`` and entries inspected with ``lstat``;
* an entry is replaced with ``rename``, which replaces a symlink itself and never writes
  through it; a directory lands on a non-directory (file or link) only after that entry is
  unlinked, and merges into a directory that is really one (docker ``cp`` behaviour);
* across filesystems (EXDEV) the copy is written under a fresh name with exclusive creation
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, ``mkdir``, ``symlink``) and renamed over the target, so
  a race with the guest fails instead of following.

Naming follows docker ``cp``: DEST an existing directory -> DEST/name; DEST missing -> DEST is
the copy; contents (``/dir/.``) merge into DEST; a directory onto an existing file is an error,
at any depth, and a non-directory onto a directory too: both are checked before anything is
moved. A DEST that is a device, socket or FIFO (or a link to one, or to /proc/..., /dev/fd/...,
/dev/std*) is refused rather than replaced.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from ..diskspace import MIB, DiskSpaceError
from ..errors import ConfigError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1024 * 1024


def shown(text: str) -> str:
    """``text`` fit for a terminal: as is when printable, else its repr.

    Why: names below the destination come from the guest's archive, and ``boxlite cp``
    prints our messages. A name holding escape sequences (``\x1b]0;...\x07``, ``\r``)
    would rewrite the user's terminal, and a lone surrogate (undecodable bytes) made
    printing the message itself fail.
    """
    return text if text.isprintable() else repr(text)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "special file"


def _open_staged_dir(parent_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open a staged directory for moving its entries out, whatever mode the guest gave it
    (a 0555 dir cannot be emptied by a non-root user): u+rwx first, by name — the staging
    directory is private, nobody else can swap the entry. Returns (fd, stat before)."""
    st = os.lstat(name, dir_fd=parent_fd)
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd), st


class _Placer:
    """Moves (or copies, across filesystems) staged entries into open destination dirs."""

    def __init__(self, shown: str) -> None:
        self.shown = shown  # the destination as the user typed it, for messages

    def put(self, src_fd: int, src: str, dst_fd: int, dst: str, where: str) -> None:
        """Put staged entry ``src_fd``/``src`` at ``dst_fd``/``dst`` (``where``: for errors)."""
        s = os.lstat(src, dir_fd=src_fd)
        d = _lstat(dst, dst_fd)
        if d is not None and stat.S_ISDIR(d.st_mode):
            if not stat.S_ISDIR(s.st_mode):
                raise ConfigError(
                    f"copy: {shown(where)} is a directory; cannot replace it with a "
                    f"{_kind(s.st_mode)}"
                )
            self.merge(src_fd, src, dst_fd, dst, where)
            return
        if d is not None and stat.S_ISDIR(s.st_mode):
            if not stat.S_ISLNK(d.st_mode):  # :func:`_check_conflicts` said so before; a race
                raise _dir_onto_file(where, d.st_mode)
            os.unlink(dst, dir_fd=dst_fd)  # a link where the directory goes: replaced
        self.move(src_fd, src, dst_fd, dst, where)

    def merge(self, src_fd: int, src: str, dst_fd: int, dst: str, where: str) -> None:
        """Merge staged directory ``src`` into the existing directory ``dst`` (not a link)."""
        try:
            into = os.open(dst, _DIR_FLAGS, dir_fd=dst_fd)
        except OSError as exc:
            raise ConfigError(
                f"copy: {shown(where)} changed while copying ({exc.strerror}); not following it"
            ) from exc
        try:
            sdir, st = _open_staged_dir(src_fd, src)
            try:
                for child in os.listdir(sdir):
                    self.put(sdir, child, into, child, f"{where}/{child}")
                os.fchmod(into, stat.S_IMODE(st.st_mode))
                os.utime(into, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(sdir)
        finally:
            os.close(into)

    def move(self, src_fd: int, src: str, dst_fd: int, dst: str, where: str) -> None:
        """rename(2): replaces a non-directory (a symlink itself, never its target)."""
        try:
            _rename(src_fd, src, dst_fd, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise ConfigError(
                    f"copy: cannot put the result at {shown(where)}: {exc.strerror}"
                ) from exc
        tmp = f".boxlite-cp-{secrets.token_hex(6)}"
        try:
            self.copy_new(src_fd, src, dst_fd, tmp)
            os.rename(tmp, dst, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
        except BaseException:
            self.remove(dst_fd, tmp)
            raise

    @staticmethod
    def remove(dir_fd: int, name: str) -> None:
        st = _lstat(name, dir_fd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(dir_fd, name)
        else:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass

    def copy_new(self, src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        """Copy ``src`` to a *new* entry ``dst``: every creation exclusive, nothing followed."""
        st = os.lstat(src, dir_fd=src_fd)
        mode = stat.S_IMODE(st.st_mode)
        times = (st.st_atime_ns, st.st_mtime_ns)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src, dir_fd=src_fd), dst, dir_fd=dst_fd)
            os.utime(dst, ns=times, dir_fd=dst_fd, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
            try:
                dfd = os.open(dst, _NEW_FILE_FLAGS, 0o600, dir_fd=dst_fd)
                try:
                    _copy_data(sfd, dfd, st.st_size)
                    os.fchmod(dfd, mode)
                    os.utime(dfd, ns=times)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, 0o700, dir_fd=dst_fd)
            dfd = os.open(dst, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                sfd, _ = _open_staged_dir(src_fd, src)
                try:
                    for child in os.listdir(sfd):
                        self.copy_new(sfd, child, dfd, child)
                finally:
                    os.close(sfd)
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=times)
            finally:
                os.close(dfd)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dst, 0o600, dir_fd=dst_fd)
            fd = os.open(dst, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dst_fd)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        else:  # the stager never makes one; refuse rather than guess
            raise ConfigError(f"copy: staged entry {src!r} is a special file; not copied")


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove directory ``dir_fd``/``name`` and all below it, read-only directories too.

    Why not ``shutil.rmtree(ignore_errors=True)`` alone: a directory whose archive mode has
    no u+w (0555) cannot be emptied by a user without CAP_DAC_OVERRIDE, so a refused or
    interrupted copy left the staged tree in ``HOME/tmp``, or a half-copied
    ``.boxlite-cp-*`` tree in DEST. Each directory gets u+rwx first, top-down, through an
    ``O_PATH | O_NOFOLLOW`` fd and ``/proc/self/fd`` (the destination may be guest-writable:
    a name swapped for a symlink yields the link's own fd, which is skipped, never its
    target). The tree is at most MAX_DEPTH deep (untar refuses deeper), so the recursion of
    ``fwalk``/``rmtree`` stays far from Python's limit.
    """
    _user_rwx(name, dir_fd)  # fwalk must be able to open the top
    try:
        for _top, subdirs, _files, dfd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
            for sub in subdirs:
                _user_rwx(sub, dfd)
    except OSError:
        pass  # best effort; rmtree below removes what it can
    shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)  # fd-based, no links followed


def _user_rwx(name: str, dir_fd: int) -> None:
    """Add u+rwx to directory ``dir_fd``/``name`` (a symlink there is left alone)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """rename(2) that also moves a staged read-only directory.

    Why: moving a directory to another parent rewrites its ``..`` entry, which needs write
    permission on the directory itself; for a user without CAP_DAC_OVERRIDE a guest's 0555
    directory failed with EACCES ("cannot put the result"). u+w is added through an fd and
    taken away through the same fd after the move, so the inode's mode is what the archive
    said and no name is trusted in between.
    """
    st = os.lstat(src, dir_fd=src_fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWUSR:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    fd = os.open(src, _DIR_FLAGS, dir_fd=src_fd)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        try:
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        finally:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd)


def _dir_onto_file(where: str, mode: int) -> ConfigError:
    return ConfigError(
        f"copy: cannot copy a directory onto the {_kind(mode)} {shown(where)}; remove it or name "
        f"another destination (nothing was copied)"
    )


def _check_conflicts(src_fd: int, src: str, dst_fd: int, dst: str, where: str) -> None:
    """Refuse, before anything is moved, a staged entry that cannot land where it goes.

    docker ``cp`` refuses to overwrite a directory with a non-directory or a non-directory
    with a directory at any depth (NoOverwriteDirNonDir). Merging used to find the first
    conflict half-way, with earlier entries already moved into DEST, and to delete a user's
    regular file where a directory landed. A symlink in the way is still replaced (it may be
    a link the guest planted in a volume; it is never followed).
    """
    s = os.lstat(src, dir_fd=src_fd)
    d = _lstat(dst, dst_fd)
    if d is None:
        return
    if stat.S_ISDIR(d.st_mode):
        if not stat.S_ISDIR(s.st_mode):
            raise ConfigError(
                f"copy: {shown(where)} is a directory; cannot replace it with a "
                f"{_kind(s.st_mode)} (nothing was copied)"
            )
        try:
            into = os.open(dst, _DIR_FLAGS, dir_fd=dst_fd)
        except OSError:
            return  # changed under us: put() fails safely on it
        try:
            sfd, _ = _open_staged_dir(src_fd, src)
            try:
                for child in os.listdir(sfd):
                    _check_conflicts(sfd, child, into, child, f"{where}/{child}")
            finally:
                # the merge that follows copies the archive's mode from this inode: restore it
                if stat.S_IMODE(s.st_mode) & 0o700 != 0o700:
                    os.fchmod(sfd, stat.S_IMODE(s.st_mode))
                os.close(sfd)
        finally:
            os.close(into)
    elif stat.S_ISDIR(s.st_mode) and not stat.S_ISLNK(d.st_mode):
        raise _dir_onto_file(where, d.st_mode)


def _copy_data(sfd: int, dfd: int, size: int) -> None:
    """Kernel-side copy where possible (copy_file_range), else read/write."""
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(sfd, dfd, min(left, 1 << 30))
            if n == 0:
                break
            left -= n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(sfd, size - left, os.SEEK_SET)
    while data := os.read(sfd, CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(dfd, view):]


def place(stage_fd: int, staged: str, kind: str, dest: str | os.PathLike[str], *,
          name: str, contents: bool, need_bytes: int = 0, need_inodes: int = 0) -> Path:
    """Put ``stage_fd``/``staged`` (a ``kind`` "dir"/"file"/"symlink"/"fifo") at ``dest``.

    ``name``: the result's name when ``dest`` is an existing directory (from the request);
    ``contents``: merge the staged directory's entries into ``dest`` (``BOX:/dir/.``).
    ``need_bytes``/``need_inodes``: what the staged tree takes, checked against the free
    space and inodes when the destination is on another filesystem (it is written again).
    Returns the host path written. Raises ConfigError for a destination that cannot take
    the result (missing parent, a directory onto a file or a non-directory onto a directory
    at any depth — refused before anything is moved —, a trailing '/' on a missing or
    non-directory path, an entry that changed into a link while copying, a write the OS
    refused); DiskSpaceError when a copy across filesystems would not fit or the disk filled.
    """
    try:
        return _place(stage_fd, staged, kind, dest, name=name, contents=contents,
                      need=(need_bytes, need_inodes))
    except OSError as exc:
        # Why: a raw OSError (ENOSPC from a full destination, EACCES, EIO) reached the CLI as
        # a traceback; the entry being written was already removed by _Placer.move.
        shown = os.fspath(dest)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"copy-out to {shown} ran out of disk space or inodes ({exc.strerror}); free "
                f"space there or copy to another filesystem"
            ) from exc
        raise ConfigError(
            f"copy: could not write the result at {shown}: {exc}; check that destination"
        ) from exc


def _place(stage_fd: int, staged: str, kind: str, dest: str | os.PathLike[str], *,
           name: str, contents: bool, need: tuple[int, int]) -> Path:
    """:func:`place` without the OSError translation."""
    text = os.fspath(dest)
    if not text:
        raise ConfigError("copy: the host destination is empty")
    wants_dir = text.endswith("/") or text.endswith("/.") or text in (".", "..")
    trimmed = text.rstrip("/") or "/"
    parent, leaf = os.path.split(trimmed)
    placer = _Placer(text)
    if leaf in ("", ".", ".."):  # "/", "dir/.", "..": a directory named by the user's path
        parent, leaf = trimmed, ""
    try:
        parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"copy: host directory {parent or '.'} does not exist or is not a directory "
            f"({exc.strerror}); create it first"
        ) from exc
    try:
        if not leaf:
            return _into_dir(placer, stage_fd, staged, os.dup(parent_fd), text,
                             name=name, contents=contents, need=need)
        st = _lstat(leaf, parent_fd)
        if st is None:
            if wants_dir and kind != "dir":
                raise ConfigError(
                    f"copy: no such directory: {text} does not exist (a file is copied into "
                    f"an existing directory; drop the trailing '/' to create a file by that "
                    f"name)"
                )
            _check_room(stage_fd, need, parent_fd, text)
            placer.put(stage_fd, staged, parent_fd, leaf, trimmed)
            return Path(trimmed)
        if stat.S_ISDIR(st.st_mode):
            try:
                into = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                raise ConfigError(f"copy: {text} changed while copying: {exc.strerror}") from exc
            return _into_dir(placer, stage_fd, staged, into, trimmed,
                             name=name, contents=contents, need=need)
        if wants_dir:
            what = "a symlink (not followed)" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ConfigError(f"copy: destination {text} is {what}; name a directory")
        _refuse_special_dest(st, leaf, parent_fd, text)
        if kind == "dir" and not stat.S_ISLNK(st.st_mode):
            raise ConfigError(
                f"copy: cannot copy a directory onto the file {text}; remove it or name a "
                f"directory"
            )
        # a file, or a symlink standing at DEST: replaced itself, never followed
        _check_room(stage_fd, need, parent_fd, text)
        placer.put(stage_fd, staged, parent_fd, leaf, trimmed)
        return Path(trimmed)
    finally:
        os.close(parent_fd)


def _refuse_special_dest(st: os.stat_result, leaf: str, parent_fd: int, text: str) -> None:
    """Refuse a DEST the user named that is a device, socket or FIFO, or a link to one.

    Why: DEST is replaced, never written through (it may be a link the guest planted). For
    ``boxlite cp BOX:/log /dev/null`` or ``/dev/stdout`` (a link to /proc/self/fd/1) run as
    root, that replaced the system's /dev/null or /dev/stdout with the guest's file. What a
    link points at is looked at (stat) only to refuse; nothing is written through it.
    """
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(leaf, dir_fd=parent_fd)
        except OSError:
            return
        # /dev/stdout -> /proc/self/fd/1, which may be a regular file (stdout redirected)
        if target.startswith(("/proc/", "/dev/fd/", "/dev/std")):
            raise ConfigError(
                f"copy: destination {shown(text)} is a link to {shown(target)}; copy-out does "
                f"not replace it (writing to a stream is not supported): name a path for the copy"
            )
        try:
            mode = os.stat(leaf, dir_fd=parent_fd).st_mode
        except OSError:
            return  # dangling or a loop: replaced as a link
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
        what = "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else (
            "socket" if stat.S_ISSOCK(mode) else "FIFO")
        via = "a link to a " if stat.S_ISLNK(st.st_mode) else "a "
        raise ConfigError(
            f"copy: destination {shown(text)} is {via}{what}; copy-out writes a file or "
            f"directory and does not replace it (writing to a stream is not supported): name "
            f"a path for the copy"
        )


def _into_dir(placer: _Placer, stage_fd: int, staged: str, into: int, shown: str,
              *, name: str, contents: bool, need: tuple[int, int]) -> Path:
    """DEST is an existing directory (fd ``into``, owned here): the copy goes inside it."""
    try:
        _check_room(stage_fd, need, into, shown)
        if contents:
            sdir, _ = _open_staged_dir(stage_fd, staged)
            try:
                children = os.listdir(sdir)
                for child in children:
                    _check_conflicts(sdir, child, into, child, os.path.join(shown, child))
                for child in children:
                    placer.put(sdir, child, into, child, os.path.join(shown, child))
            finally:
                os.close(sdir)
            return Path(shown)
        _check_conflicts(stage_fd, staged, into, name, os.path.join(shown, name))
        placer.put(stage_fd, staged, into, name, os.path.join(shown, name))
        return Path(shown) / name
    finally:
        os.close(into)


def _check_room(stage_fd: int, need: tuple[int, int], dst_fd: int, shown: str) -> None:
    """Across filesystems the tree is written again: check bytes and inodes before starting.

    No boxlite reserve here: the reserve keeps room for boxlite's own database and logs on
    the runtime home's filesystem, and the staging dir is on that one, so this destination is
    another filesystem. Requiring 256 MiB free on it refused a 5-byte file onto an 8 MiB
    tmpfs or a nearly full USB stick, which ``docker cp`` and ``cp`` copy. Inodes: a tree of
    many small files used to run out of them half-way with a raw ENOSPC.
    """
    if os.fstat(stage_fd).st_dev == os.fstat(dst_fd).st_dev:
        return
    need_bytes, need_inodes = need
    st = os.statvfs(dst_fd)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise DiskSpaceError(
            f"not enough disk space for copy-out to {shown}: needs {_mib(need_bytes)} MiB, "
            f"{free // MIB} MiB free; free space there or copy to another filesystem"
        )
    if st.f_files and st.f_favail < need_inodes:
        raise DiskSpaceError(
            f"not enough free inodes for copy-out to {shown}: needs {need_inodes}, "
            f"{st.f_favail} free; delete files there or copy to another filesystem"
        )


def _mib(n: int) -> int:
    return -(-n // MIB)


__all__ = ["place", "remove_tree", "shown"]
