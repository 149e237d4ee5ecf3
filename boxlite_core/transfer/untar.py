"""Unpack a hostile tar stream into a private staging directory, fd-relative, never via a link.

Why not ``TarFile.extractall(filter="data")``: its safety is a path check done *before* the
write (``os.path.realpath`` of the name and of each link target), then a write by path that
follows whatever the filesystem holds at that moment. Python 3.11.7's filter is bypassed by a
chain of symlinks longer than PATH_MAX (CVE-2025-4517: ``realpath`` gives up, the check
passes, the kernel follows the chain out of the destination), and fixes keep coming
(cpython#135034, #149486, #151558). Here the *parser* of tarfile reads headers; every write is
ours:

* each path is opened one component at a time from the staging directory's fd with
  ``O_NOFOLLOW | O_DIRECTORY``: a symlink is never traversed, whatever its target;
* files, dirs, links and FIFOs are created with exclusive creation (``O_EXCL``, ``mkdir``,
  ``symlink``, ``link``, ``mkfifo``) relative to that fd: nothing that already exists is
  written through;
* names are checked as data: relative, no ``..``, under the one top entry the request asked
  for, parent directory listed before its children, no entry twice (directories excepted);
* hard links may only point at a regular file written earlier from the same archive;
* device nodes are refused (the whole copy fails); setuid/setgid/sticky bits are dropped from
  files and reported; directories keep setgid and sticky (``cp -a`` semantics);
* symlinks are written as inert links with their target as given, absolute ones too;
* the declared sizes are counted against the free space of the staging filesystem before a
  byte is written, and oversized extended headers are refused before tarfile reads them;
* what tarfile itself would hold in memory without bound is refused before it reads it:
  GNU sparse members (their maps), pax global headers beyond 1 MiB in all; names longer
  than PATH_MAX or deeper than MAX_DEPTH are refused (placing and removing recurse).

Ownership is not copied: the result belongs to the user running the copy (docker ``cp``).
"""

from __future__ import annotations

import errno
import os
import tarfile
from collections.abc import Iterable, Iterator

import attrs

from ..diskspace import DiskSpaceError, free_bytes, reserve_bytes
from ..errors import BoxliteError, GuestError

#: the staged result's name inside the staging directory
RESULT = "result"
CHUNK = 1024 * 1024
#: largest extended (pax / GNU long name) header we let tarfile read into memory
MAX_EXTENDED_HEADER = 1024 * 1024
#: bytes counted per entry on top of its data (inode, directory entry, tar header)
ENTRY_OVERHEAD = 4096
#: longest member or hard-link name (bytes): PATH_MAX less the NUL. The agent builds its
#: archive from real paths, which the kernel caps at this; longer names only come from a
#: hostile stream, and each one costs memory and a component-by-component open per entry
MAX_NAME = 4095
#: deepest member (directory levels below the result). Placing and removing a tree walks it
#: recursively (Python's limit is 1000 frames, two per level when merging): a guest's
#: 1500-level tree crashed copy-out with RecursionError and left the staging dir behind.
#: Real trees are far shallower (node_modules: tens of levels)
MAX_DEPTH = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: file mode bits kept: rwx for user, group, other (setuid/setgid/sticky are dropped)
FILE_BITS = 0o777
#: directory mode bits kept: rwx plus setgid and sticky (setuid has no meaning on a dir)
DIR_BITS = 0o3777
_EXTENDED_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
     tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a pax/GNU extended header larger than MAX_EXTENDED_HEADER.

    Why: tarfile reads such a header's whole declared size into memory before we see any
    member; a guest could declare gigabytes and exhaust the host's memory.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes (limit {MAX_EXTENDED_HEADER})"
            )
        if self.type == tarfile.XGLTYPE:
            # global headers accumulate in TarFile.pax_headers for the rest of the stream and
            # are copied into every later member: bound their sum, not only each one
            total = getattr(tarfile_, "_boxlite_global_bytes", 0) + self.size
            if total > MAX_EXTENDED_HEADER:
                raise tarfile.HeaderError(
                    f"pax global headers of {total} bytes in all (limit {MAX_EXTENDED_HEADER})"
                )
            tarfile_._boxlite_global_bytes = total  # type: ignore[attr-defined]
        return super()._proc_member(tarfile_)

    # Sparse members are refused before tarfile parses their map. Why: the map is read into a
    # Python list of ints with no bound (GNU sparse 1.0 keeps it in the member's data, old GNU
    # sparse in a chain of extension blocks): a 64 MiB stream of "1\n" grew the host process
    # by 260 MiB and took 30 s. The agent never writes sparse members (tarfile cannot).
    def _refuse_sparse(self, *args: object) -> tarfile.TarInfo:
        # pax sparse: called on the pax header with the member as first argument
        member = args[0] if args and isinstance(args[0], tarfile.TarInfo) else self
        raise tarfile.HeaderError(
            f"member {member.name!r} is a GNU sparse file; copy-out refuses sparse archives"
        )

    _proc_sparse = _refuse_sparse
    _proc_gnusparse_00 = _refuse_sparse
    _proc_gnusparse_01 = _refuse_sparse
    _proc_gnusparse_10 = _refuse_sparse


class ChunkReader:
    """A forward-only file over an iterator of byte chunks (the gRPC download stream).

    Why not tarfile's stream mode ("r|"): its buffer keeps the unread rest as one bytes
    object and re-slices it on every read, so each 512-byte header copies up to the whole
    buffer again (measured: slower than writing the tar to disk first). Here every byte is
    copied once. ``seek`` only moves forward (tarfile in "r:" mode seeks to the next header
    and to member data, never back, as long as nobody extracts a hard link through tarfile).
    """

    mode = "rb"

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._chunk = b""
        self._off = 0
        self.total = 0  #: bytes consumed so far (= tell())

    def _fill(self) -> bool:
        while self._off >= len(self._chunk):
            try:
                self._chunk = next(self._it)
            except StopIteration:
                self._chunk, self._off = b"", 0
                return False
            self._off = 0
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        parts: list[bytes] = []
        while size > 0 and self._fill():
            avail = len(self._chunk) - self._off
            if self._off == 0 and avail <= size:
                parts.append(self._chunk)  # whole chunk: no copy
                take = avail
            else:
                take = min(avail, size)
                parts.append(self._chunk[self._off : self._off + take])
            self._off += take
            self.total += take
            size -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def tell(self) -> int:
        return self.total

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.total + pos if whence == 1 else -1
        if target < self.total:
            raise OSError(f"cannot seek back in a stream (to {pos}, whence {whence})")
        while self.total < target and self._fill():
            take = min(len(self._chunk) - self._off, target - self.total)
            self._off += take
            self.total += take
        return self.total


@attrs.frozen
class Unpacked:
    """What :func:`unpack` staged.

    ``kind``: the result's type, "dir", "file", "symlink" or "fifo". ``entries``: members
    written. ``data_bytes``: file bytes written. ``stripped``: member names (as in the
    archive) whose setuid/setgid/sticky bits were dropped.
    """

    kind: str
    entries: int
    data_bytes: int
    stripped: tuple[str, ...]


class ArchiveRefused(GuestError):
    """The guest's archive broke a rule; nothing of it is placed on the host."""


def _split(name: str, what: str) -> tuple[str, ...]:
    """A member or link name as path components; refuses absolute, '..', NUL, a name longer
    than MAX_NAME bytes and one deeper than MAX_DEPTH below the top entry."""
    if "\x00" in name:
        raise ArchiveRefused(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise ArchiveRefused(f"{what} {name!r} is absolute; archives must use relative names")
    if len(name) > MAX_NAME and len(os.fsencode(name)) > MAX_NAME:
        raise ArchiveRefused(
            f"{what} {name[:60]!r}... is {len(os.fsencode(name))} bytes long, longer than a "
            f"path can be (limit {MAX_NAME}); refused"
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveRefused(f"{what} {name!r} contains '..'")
    if len(parts) > MAX_DEPTH + 1:
        raise ArchiveRefused(
            f"{what} {name[:60]!r}... has {len(parts)} path components (limit "
            f"{MAX_DEPTH + 1}); refused: copy a subdirectory of it instead"
        )
    return parts


def _key(rel: tuple[str, ...]) -> str:
    """``rel`` as one string: the bookkeeping key of an entry. Why not the tuple: a tuple
    holds a separate str object per component, so a deep name cost ~60 bytes per level per
    entry (20x the stream's bytes); a joined string costs its own length."""
    return "/".join(rel)


def _kind_of(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isfifo():
        return "fifo"
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    return f"tar type {member.type!r}"


def _free_inodes(fd: int) -> int:
    """Inodes we may still use (minus a margin); filesystems without a count: unlimited."""
    st = os.statvfs(fd)
    if st.f_files == 0:  # btrfs and others report no inode limit
        return 1 << 62
    return max(0, st.f_favail - max(1024, st.f_files // 100))


def _mtime_ns(member: tarfile.TarInfo) -> int | None:
    try:
        value = int(float(member.mtime) * 1_000_000_000)
    except (OverflowError, ValueError, TypeError):
        return None
    return value if -(2**62) < value < 2**62 else None


class _Stager:
    """Writes members below ``stage_fd``/RESULT; every path opened component by component."""

    def __init__(self, stage_fd: int, budget: int, stage_path: str) -> None:
        self.stage_fd = stage_fd
        self.budget = budget
        self.stage_path = stage_path
        self.seen: dict[str, str] = {}  # _key(rel) -> kind
        self.dirs: dict[str, tuple[int, int | None]] = {}  # _key(rel) -> (mode, mtime)
        self.stripped: list[str] = []
        self.used = 0
        self.data_bytes = 0
        self.entries = 0
        self.inodes = _free_inodes(stage_fd)
        self._cached: tuple[tuple[str, ...], int] | None = None

    # -- directory fds ---------------------------------------------------------------------

    def _open_dir(self, rel: tuple[str, ...]) -> int:
        """An fd of staged directory ``rel`` (relative to RESULT), no link ever followed."""
        fd = os.open(RESULT, _DIR_FLAGS, dir_fd=self.stage_fd)
        try:
            for part in rel:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent_fd(self, rel: tuple[str, ...]) -> tuple[int, str]:
        """(fd of the directory that holds ``rel``, leaf name); the root entry lives in the
        staging directory itself, as RESULT."""
        if not rel:
            return self.stage_fd, RESULT
        parent = rel[:-1]
        if self._cached is None or self._cached[0] != parent:
            self.close()
            self._cached = (parent, self._open_dir(parent))
        return self._cached[1], rel[-1]

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    # -- checks ----------------------------------------------------------------------------

    def charge(self, nbytes: int, name: str) -> None:
        """Count ``nbytes`` against the free space measured at the start (and one inode
        against the free inodes); refuse beyond either."""
        self.used += nbytes + ENTRY_OVERHEAD
        self.inodes -= 1
        if self.inodes < 0:
            raise DiskSpaceError(
                f"copy-out of {name!r}: the archive has more entries than the free inodes "
                f"under {self.stage_path}; free some there or set BOXLITE_HOME elsewhere"
            )
        if self.used > self.budget:
            raise DiskSpaceError(
                f"copy-out of {name!r}: the archive needs more than the "
                f"{self.budget // (1024 * 1024)} MiB free under {self.stage_path} "
                f"(after a {reserve_bytes() // (1024 * 1024)} MiB reserve); free space there "
                f"or set BOXLITE_HOME to a larger filesystem"
            )

    def check_place(self, rel: tuple[str, ...], name: str, kind: str) -> None:
        """The parent must be a directory staged from this archive; no non-dir twice."""
        if rel:
            parent = rel[:-1]
            if self.seen.get(_key(parent)) != "dir":
                for depth in range(len(parent), 0, -1):
                    kind_above = self.seen.get(_key(parent[:depth]))
                    if kind_above is not None and kind_above != "dir":
                        raise ArchiveRefused(
                            f"member {name!r} is below a {kind_above} of the archive "
                            f"({'/'.join(parent[:depth])!r}); refused: it would be written "
                            f"through a link"
                        )
                raise ArchiveRefused(f"member {name!r} comes before its parent directory")
        elif kind not in ("dir", "file", "symlink", "fifo"):
            raise ArchiveRefused(f"the top entry {name!r} is a {kind}; refused")
        before = self.seen.get(_key(rel))
        if before is not None and not (before == "dir" and kind == "dir"):
            raise ArchiveRefused(f"member {name!r} appears twice in the archive; refused")

    # -- writers ---------------------------------------------------------------------------

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                   rel: tuple[str, ...]) -> None:
        self.charge(member.size, member.name)
        dfd, leaf = self.parent_fd(rel)
        fd = os.open(leaf, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
        try:
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveRefused(f"member {member.name!r} has no data")
            written = 0
            while data := src.read(CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                written += len(data)
            if written != member.size:
                raise ArchiveRefused(f"member {member.name!r} is truncated")
            self.data_bytes += written
            os.fchmod(fd, self._file_mode(member))
            mtime = _mtime_ns(member)
            if mtime is not None:
                os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _file_mode(self, member: tarfile.TarInfo) -> int:
        if member.mode & ~FILE_BITS & 0o7777:
            self.stripped.append(member.name)
        return member.mode & FILE_BITS

    def make_dir(self, member: tarfile.TarInfo, rel: tuple[str, ...]) -> None:
        mode = member.mode & DIR_BITS
        if member.mode & 0o4000:
            self.stripped.append(member.name)
        if self.seen.get(_key(rel)) == "dir":  # listed again: the last mode wins, as with tar
            self.dirs[_key(rel)] = (mode, _mtime_ns(member))
            return
        self.charge(0, member.name)
        dfd, leaf = self.parent_fd(rel)
        os.mkdir(leaf, 0o700, dir_fd=dfd)  # opened up after its children are written
        self.dirs[_key(rel)] = (mode, _mtime_ns(member))

    def make_symlink(self, member: tarfile.TarInfo, rel: tuple[str, ...]) -> None:
        target = member.linkname
        if not target or "\x00" in target or len(target) >= 4096:
            raise ArchiveRefused(f"symlink {member.name!r} has an invalid target")
        self.charge(len(target), member.name)
        dfd, leaf = self.parent_fd(rel)
        os.symlink(target, leaf, dir_fd=dfd)  # inert: written as given, never resolved
        mtime = _mtime_ns(member)
        if mtime is not None:
            os.utime(leaf, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)

    def make_hardlink(self, member: tarfile.TarInfo, rel: tuple[str, ...], top: str) -> None:
        target = _under_top(_split(member.linkname, f"hard link target of {member.name!r}"),
                            top, member.linkname)
        if self.seen.get(_key(target)) != "file":
            raise ArchiveRefused(
                f"hard link {member.name!r} points at {member.linkname!r}, which is not a "
                f"regular file earlier in the same archive; refused"
            )
        self.charge(0, member.name)
        if target:
            src_fd = self._open_dir(target[:-1])
            src_leaf = target[-1]
        else:
            src_fd, src_leaf = os.dup(self.stage_fd), RESULT
        try:
            dfd, leaf = self.parent_fd(rel)
            os.link(src_leaf, leaf, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(src_fd)

    def make_fifo(self, member: tarfile.TarInfo, rel: tuple[str, ...]) -> None:
        self.charge(0, member.name)
        dfd, leaf = self.parent_fd(rel)
        os.mkfifo(leaf, 0o600, dir_fd=dfd)
        # a FIFO we just made in our private directory: chmod by name cannot be redirected
        os.chmod(leaf, self._file_mode(member), dir_fd=dfd)

    def finish_dirs(self) -> None:
        """Apply directory modes and times deepest first (a 0555 dir got its children)."""
        self.close()
        for key in sorted(self.dirs, key=lambda k: k.count("/") + bool(k), reverse=True):
            mode, mtime = self.dirs[key]
            fd = self._open_dir(tuple(key.split("/")) if key else ())
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def _under_top(parts: tuple[str, ...], top: str, name: str) -> tuple[str, ...]:
    """Components relative to the result: the archive must hold only ``top`` and below it."""
    if top == ".":
        return parts
    if not parts or parts[0] != top:
        raise ArchiveRefused(
            f"member {name!r} is not the requested entry {top!r} or below it; refused"
        )
    return parts[1:]


def unpack(chunks: Iterable[bytes], stage_fd: int, top: str, *,
           stage_path: str = "the staging directory", budget: int | None = None) -> Unpacked:
    """Unpack the tar stream ``chunks`` into ``stage_fd``/RESULT.

    ``stage_fd``: an fd of an empty, private directory (0700, ours); ``top``: the one top
    entry the archive may hold (``"."`` for the contents of a directory); ``budget``: bytes
    that may be written (default: free space at ``stage_path`` minus the reserve).
    Raises ArchiveRefused (a GuestError) for anything the rules above refuse or a stream
    that is not a tar, DiskSpaceError when the declared sizes exceed the budget. On error
    the caller removes the staging directory; nothing outside it was touched.
    """
    if budget is None:
        budget = max(0, free_bytes(stage_path) - reserve_bytes()) if stage_path else 1 << 62
    stager = _Stager(stage_fd, budget, stage_path)
    root_kind: str | None = None
    try:
        with tarfile.open(fileobj=ChunkReader(chunks), mode="r:",  # type: ignore[arg-type]
                          tarinfo=BoundedTarInfo) as tar:
            # next() by hand, dropping each TarInfo: TarFile keeps every member it read in
            # ``members``, which a stream of millions of empty entries would grow unbounded
            while (member := tar.next()) is not None:
                tar.members.clear()
                name = member.name
                if member.size < 0:  # a pax "size" record can say anything
                    raise ArchiveRefused(f"member {name!r} declares a negative size")
                kind = _kind_of(member)
                rel = _under_top(_split(name, "member"), top, name)
                if root_kind is None and rel:
                    raise ArchiveRefused(
                        f"the archive does not start with the requested entry {top!r} "
                        f"(first member {name!r})"
                    )
                stager.check_place(rel, name, kind)
                if kind == "file":
                    stager.write_file(tar, member, rel)
                elif kind == "dir":
                    stager.make_dir(member, rel)
                elif kind == "symlink":
                    stager.make_symlink(member, rel)
                elif kind == "hardlink":
                    stager.make_hardlink(member, rel, top)
                    kind = "file"
                elif kind == "fifo":
                    stager.make_fifo(member, rel)
                elif kind.endswith("device"):
                    raise ArchiveRefused(
                        f"member {name!r} is a {kind}; copy-out refuses device nodes"
                    )
                else:
                    raise ArchiveRefused(f"member {name!r} is a {kind}; refused")
                if not rel:
                    root_kind = kind
                stager.seen[_key(rel)] = kind
                stager.entries += 1
        if root_kind is None:
            raise ArchiveRefused(f"the archive is empty (expected {top!r})")
        if top == "." and root_kind != "dir":
            raise ArchiveRefused(f"the contents of a directory were asked for; got a {root_kind}")
        stager.finish_dirs()
    except BoxliteError:
        raise  # ours, or the download's (GuestPathError is a ValueError: not a bad name)
    except tarfile.TarError as exc:
        raise ArchiveRefused(f"not a valid tar stream: {exc}") from exc
    except OSError as exc:  # EEXIST, ELOOP, ENOTDIR, ENAMETOOLONG ... from a crafted name
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # the declared sizes fitted; someone else filled the disk meanwhile. Not the
            # guest's fault: blaming its archive (GuestError) sent users looking at the box
            raise DiskSpaceError(
                f"copy-out: {stage_path} filled up while staging the archive "
                f"({exc.strerror}); free space there or set BOXLITE_HOME elsewhere"
            ) from exc
        raise ArchiveRefused(f"could not stage the archive: {exc}") from exc
    except ValueError as exc:  # e.g. os functions on odd names
        raise ArchiveRefused(f"bad member name: {exc}") from exc
    finally:
        stager.close()
    return Unpacked(
        kind=root_kind,
        entries=stager.entries,
        data_bytes=stager.data_bytes,
        stripped=tuple(stager.stripped),
    )


__all__ = ["RESULT", "ArchiveRefused", "BoundedTarInfo", "ChunkReader", "Unpacked", "unpack"]
