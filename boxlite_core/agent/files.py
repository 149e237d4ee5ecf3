"""Upload/Download as tar streams, confined to the container root.

Why fork + chroot: path resolution (.., absolute symlinks, symlinked parents) then happens
*inside* the container by construction, like `docker cp`; the per-member checks below
additionally reject archives that try to leave the target directory or write through links.

Why tarfile only parses and builds headers here: the agent runs under TCG in the guest, where
every Python-level pass over the data costs ~10x what it costs on the host. tarfile's stream
mode moves file data in 10 KiB records and 16 KiB copies, re-slicing its buffer each time
(5 000+ Python iterations for 50 MiB). File contents go between the pipe and the file in the
kernel instead (``splice`` in, ``sendfile`` out), and the pipes are 1 MiB, so the agent's
Python handles each MiB once, as one gRPC message.

Where an upload lands (``dest``) follows `docker cp`'s DEST_PATH rules (the table in docker's
``docker container cp`` reference, and moby's ``pkg/archive/copy.go``): DEST is resolved in
the container with its symlinks followed; an existing directory receives SRC under its own
name (SRC/. merges the contents); a missing DEST becomes the copy, renamed; a file replaces an
existing file; a directory onto a file, a file onto a missing ``DEST/``, and a missing parent
directory are errors. An existing directory is never replaced by a non-directory nor the
reverse, at any depth (docker's NoOverwriteDirNonDir).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import posixpath
import stat
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator

from .pid1 import Reaper

#: bytes per pipe read and per DownloadChunk; also the pipes' size (F_SETPIPE_SZ), so one
#: kernel wake-up moves one message's worth
CHUNK = 1024 * 1024
#: bytes read ahead from the upload pipe, and the largest file sent through a Python buffer
#: on download (larger ones go by splice/sendfile)
READ_AHEAD = 64 * 1024
#: symlinks followed at DEST before giving up (moby CopyInfoDestinationPath's limit)
MAX_DEST_LINKS = 10
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: splice/sendfile errors meaning "not on this pair of files": fall back to read/write
_NO_KERNEL_COPY = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EBADF)


class TransferError(Exception):
    """The archive or path was refused, or the copy failed."""


def _check_name(name: str, what: str) -> str:
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    if clean.startswith("/"):
        raise TransferError(f"{what} {name!r} is absolute; archives must use relative names")
    if ".." in clean.split("/"):
        raise TransferError(f"{what} {name!r} contains '..'")
    return clean.rstrip("/") or "."


def _no_symlinked_parent(rel: str) -> None:
    current = "."
    for part in rel.split("/")[:-1]:
        current = posixpath.join(current, part)
        if os.path.islink(current):
            raise TransferError(f"member {rel!r} would be written through the symlink {current!r}")


def _grow_pipe(fd: int) -> None:
    """Best effort: a 1 MiB pipe (64 KiB by default) means 16x fewer wake-ups per MiB."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
    except (OSError, AttributeError):
        pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _PipeReader:
    """A forward-only file over a pipe fd for tarfile's parser (mode "r:").

    Reads ahead READ_AHEAD bytes, so headers and small files cost one read each; the data
    of a larger file goes from the pipe to the file in the kernel (:meth:`copy_to`).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._buf = b""
        self._off = 0

    def read(self, size: int = -1) -> bytes:
        parts = []
        left = size if size >= 0 else 1 << 62
        while left > 0:
            if self._off >= len(self._buf):
                self._buf, self._off = os.read(self.fd, max(READ_AHEAD, min(left, CHUNK))), 0
                if not self._buf:
                    break
            take = min(left, len(self._buf) - self._off)
            parts.append(self._buf[self._off : self._off + take])
            self._off += take
            left -= take
            self.pos += take
        return b"".join(parts)

    def copy_to(self, fd: int, size: int, ended: str) -> None:
        """Write the next ``size`` bytes into ``fd``: what is read ahead, then the rest by
        splice. ``ended``: the TransferError message if the stream stops short."""
        take = min(size, len(self._buf) - self._off)
        if take:
            _write_all(fd, memoryview(self._buf)[self._off : self._off + take])
            self._off += take
        _copy_exact(self.fd, fd, size - take, _splice, ended)
        self.pos += size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self.pos:
            raise io.UnsupportedOperation("the upload stream only moves forward")
        while self.pos < target:
            if not self.read(min(target - self.pos, CHUNK)):
                break
        return self.pos

    def tell(self) -> int:
        return self.pos

    def drain(self) -> None:
        """Read to EOF (the host's end-of-archive padding), so the agent's writes end cleanly."""
        while self.read(CHUNK):
            pass


class _ArchiveOut:
    """The archive going out on a pipe fd: headers and small files gathered into writes of
    up to CHUNK (a write per 512-byte header became one gRPC message each); larger files
    sent by the kernel (sendfile) right after a flush."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            _write_all(self.fd, b"".join(self._parts))
            self._parts, self._size = [], 0

    def file(self, src: int, size: int, name: str) -> None:
        """``size`` bytes of file ``src``, then the padding to a whole block."""
        ended = f"{name} shrank while it was copied"
        if size <= READ_AHEAD:
            data = os.read(src, size)
            while len(data) < size and (more := os.read(src, size - len(data))):
                data += more
            if len(data) < size:
                raise TransferError(ended)
            self.write(data)
        else:
            self.flush()
            _copy_exact(src, self.fd, size, _sendfile, ended)
        if size % tarfile.BLOCKSIZE:
            self.write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))


def _copy_exact(src: int, dst: int, size: int, kernel_copy: Callable[[int, int, int], int],
                ended: str) -> None:
    """Move exactly ``size`` bytes from fd ``src`` to fd ``dst``: ``kernel_copy(src, dst, n)``
    (splice, sendfile) while the kernel can do it for this pair, read/write else. ``ended``:
    the TransferError message when ``src`` ends early."""
    left = size
    kernel = True
    while left > 0:
        n = None
        if kernel:
            try:
                n = kernel_copy(src, dst, min(left, CHUNK))
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
        if n is None:
            data = os.read(src, min(left, CHUNK))
            _write_all(dst, data)
            n = len(data)
        if n == 0:
            raise TransferError(ended)
        left -= n


def _splice(src: int, dst: int, n: int) -> int:
    return os.splice(src, dst, n)


def _sendfile(src: int, dst: int, n: int) -> int:
    return os.sendfile(dst, src, None, n)


def _resolve_dest(dest: str) -> tuple[str, os.stat_result | None]:
    """DEST as moby's CopyInfoDestinationPath resolves it (we are chrooted: links stay inside).

    Links at the last component are followed (at most MAX_DEST_LINKS); a dangling one names
    the file to create. Returns (path, its stat, or None when missing and the parent is a
    directory). Raises TransferError for a missing parent, a parent that is no directory, a
    trailing '/' on a non-directory, a loop."""
    path = dest
    for _ in range(MAX_DEST_LINKS + 1):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            parent = posixpath.dirname(path.rstrip("/")) or "/"
            try:
                parent_st = os.stat(parent)
            except FileNotFoundError:
                raise TransferError(f"{dest}: directory {parent} does not exist; docker cp "
                                    f"creates no parent directories: create it first") from None
            except NotADirectoryError:
                parent_st = None
            if parent_st is None or not stat.S_ISDIR(parent_st.st_mode):
                raise TransferError(f"{dest}: {parent} is not a directory") from None
            return path, None
        except NotADirectoryError:
            raise TransferError(f"{dest}: not a directory (a '/' follows a file)") from None
        if not stat.S_ISLNK(st.st_mode):
            return path, st
        target = os.readlink(path)
        path = target if target.startswith("/") else posixpath.join(
            posixpath.dirname(path.rstrip("/")) or "/", target)
    raise TransferError(f"{dest}: more than {MAX_DEST_LINKS} symlinks in a row")


def landing(dest: str, top: str, top_is_dir: bool) -> tuple[str, str]:
    """Where an upload's top entry ``top`` ("." = SRC's contents) lands for DEST ``dest``.

    Returns (directory to extract in, the top entry's name there; "." = merged into it).
    moby's PrepareArchiveCopy, in its order. Raises TransferError: a directory onto an existing
    non-directory ("cannot copy a directory onto the file"), a file to a missing path ending
    in '/' or '/.' ("no such directory"), and :func:`_resolve_dest`'s errors."""
    path, st = _resolve_dest(dest)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return path, top
    if st is not None and top_is_dir:
        raise TransferError(f"cannot copy a directory onto the {_kind(st.st_mode)} {dest}; "
                            f"remove it or name another destination")
    if st is None and not top_is_dir and (dest.endswith("/") or dest.endswith("/.")):
        raise TransferError(f"no such directory: {dest} does not exist (a file is copied "
                            f"into an existing directory; drop the trailing '/' to create a "
                            f"file by that name)")
    norm = posixpath.normpath(path)
    return posixpath.dirname(norm) or "/", posixpath.basename(norm)


def _kind(mode: int) -> str:
    return "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "special file"


def _renamer(top: str, land: str) -> Callable[[str], str]:
    """Map a member name under ``top`` to its name under ``land`` (both may be ".")."""

    def rename(rel: str) -> str:
        if top == ".":
            rest = "" if rel == "." else rel
        elif rel == top:
            rest = ""
        elif rel.startswith(top + "/"):
            rest = rel[len(top) + 1 :]
        else:
            raise TransferError(f"member {rel!r} is not under the archive's top entry {top!r}")
        if not rest:
            return land
        return rest if land == "." else f"{land}/{rest}"

    return rename


def _make_room(rel: str, member: tarfile.TarInfo) -> None:
    """docker's rule for an entry already there: a directory merges into a directory; a
    non-directory is removed and replaced (a symlink itself, never its target); a directory
    never replaces a non-directory nor the reverse (NoOverwriteDirNonDir)."""
    try:
        st = os.lstat(rel)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not member.isdir():
            raise TransferError(f"{rel!r} is a directory; cannot replace it with a non-directory")
        return
    if member.isdir():
        raise TransferError(f"cannot copy a directory onto the {_kind(st.st_mode)} {rel!r}")
    os.unlink(rel)


def _check_conflicts(manifest: bytes, rename: Callable[[str], str]) -> None:
    """Refuse, before anything is written, an archive that would put a directory where a
    non-directory is or the reverse (the rule :func:`_make_room` applies per entry; docker
    finds such a conflict half-way and leaves what it wrote so far). ``manifest``: as in
    agent.proto; the walk is top-down and skips what lies under a directory not there yet."""
    absent: set[str] = set()
    for item in manifest.split(b"\0") if manifest else ():
        is_dir, name = item[:1] == b"d", os.fsdecode(item[1:])
        rel = rename(_check_name(name, "manifest entry"))
        if rel == ".":
            continue
        parent = posixpath.dirname(rel)
        st = None
        if parent not in absent:
            try:
                st = os.lstat(rel)
            except (FileNotFoundError, NotADirectoryError):
                st = None
        if st is None:
            if is_dir:
                absent.add(rel)
        elif stat.S_ISDIR(st.st_mode) and not is_dir:
            raise TransferError(f"{rel!r} is a directory; cannot replace it with a non-directory")
        elif is_dir and not stat.S_ISDIR(st.st_mode):
            raise TransferError(f"cannot copy a directory onto the {_kind(st.st_mode)} {rel!r}")


def _write_file(reader: _PipeReader, rel: str, member: tarfile.TarInfo) -> None:
    fd = os.open(rel, _NEW_FILE, 0o600)
    try:
        reader.copy_to(fd, member.size, f"the archive ends inside {rel!r}")
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _extract(target_dir: str, dest: str, manifest: bytes) -> int:
    """Runs in the chrooted child: tar on fd 0, extracted under target_dir or at dest."""
    if not dest:
        os.makedirs(target_dir, exist_ok=True)
        os.chdir(target_dir)
    reader = _PipeReader(0)
    count = 0
    with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
        rename: Callable[[str], str] = str
        first = True
        while (member := tar.next()) is not None:
            rel = _check_name(member.name, "member")
            if first and dest:
                if "/" in rel:
                    raise TransferError(f"the archive's first member {rel!r} is not its top entry")
                where, land = landing(dest, rel, member.isdir())
                os.chdir(where)
                rename = _renamer(rel, land)
                _check_conflicts(manifest, rename)
            first = False
            rel = rename(rel)
            if member.islnk():
                # tarfile resolves hard-link targets relative to the extraction dir
                member.linkname = rename(_check_name(member.linkname,
                                                     f"hard link target of {rel!r}"))
            if member.ischr() or member.isblk():
                raise TransferError(f"member {rel!r} is a device node; refused")
            if member.issparse():
                raise TransferError(f"member {rel!r} is a GNU sparse file; refused")
            _no_symlinked_parent(rel)
            if rel != ".":
                _make_room(rel, member)
            elif not member.isdir():
                raise TransferError("the archive's '.' entry is not a directory")
            if rel == "." and dest:
                pass  # SRC/. into an existing directory: its metadata stays (docker)
            elif member.isreg():
                _write_file(reader, rel, member)
            else:
                member.name = rel
                tar.extract(member, path=".", set_attrs=True, numeric_owner=True)
            count += 1
        reader.drain()
    return count


def _fork_chrooted(reaper: Reaper, root: str, stdin: int, stdout: int, status: int, body):
    """Fork a child that chroots into root and runs body(); result/error go to `status`."""

    def child() -> None:
        try:
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(status, 3)
            os.closerange(4, 1 << 20)
            os.chroot(root)
            os.chdir("/")
            body()
        except BaseException as exc:
            text = str(exc) if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"
            raw = text.encode()[:3000]
            os.write(3, b"E" + struct.pack("=I", len(raw)) + raw)
            os._exit(1)
        os._exit(0)

    return reaper.spawn(child, lambda _status: None)


def _read_result(fd: int) -> tuple[str, int | str]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    if data[:1] == b"E":
        (n,) = struct.unpack("=I", data[1:5])
        return "E", data[5 : 5 + n].decode(errors="replace")
    if data[:1] == b"K" and len(data) >= 5:
        return "K", struct.unpack("=I", data[1:5])[0]
    return "E", "the file-transfer helper died unexpectedly"


def upload(reaper: Reaper, root: str, target_dir: str, chunks: Iterable[bytes],
           dest: str = "", manifest: bytes = b"") -> int:
    """Extract the tar ``chunks`` in the container: under ``target_dir`` (created), or, with
    ``dest``, at DEST_PATH ``dest`` by docker cp's rules (:func:`landing`), after checking
    ``manifest`` (the archive's members, agent.proto) for conflicts. Returns the number of
    entries; raises TransferError."""
    where = dest or target_dir
    if not where.startswith("/"):
        raise TransferError(f"destination {where!r} must be an absolute container path")
    data_r, data_w = os.pipe()
    status_r, status_w = os.pipe()
    _grow_pipe(data_w)
    null = os.open(os.devnull, os.O_WRONLY)

    def body() -> None:
        count = _extract(target_dir, dest, manifest)
        os.write(3, b"K" + struct.pack("=I", count))

    try:
        _fork_chrooted(reaper, root, data_r, null, status_w, body)
    finally:
        for fd in (data_r, status_w, null):
            os.close(fd)
    try:
        for chunk in chunks:
            _write_all(data_w, chunk)
    except BrokenPipeError:
        pass  # the helper refused the archive; its reason is on the status pipe
    finally:
        os.close(data_w)
    try:
        kind, value = _read_result(status_r)
    finally:
        os.close(status_r)
    if kind == "E":
        raise TransferError(f"upload to {where}: {value}")
    return int(value)


def _send_tree(tar: tarfile.TarFile, path: str, arcname: str, out: _ArchiveOut) -> None:
    """tarfile.add, with large files' data sent by the kernel: same members, same order."""
    info = tar.gettarinfo(path, arcname)
    if info is None:  # a socket: tarfile.add leaves it out too
        return
    out.write(info.tobuf(tarfile.PAX_FORMAT, tar.encoding, tar.errors))
    if info.isreg():
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            out.file(fd, info.size, path)
        finally:
            os.close(fd)
    elif info.isdir():
        for entry in sorted(os.listdir(path)):
            _send_tree(tar, posixpath.join(path, entry), posixpath.join(arcname, entry), out)


def download(reaper: Reaper, root: str, path: str) -> Iterator[bytes]:
    if not path.startswith("/"):
        raise TransferError(f"path {path!r} must be an absolute container path")
    out_r, out_w = os.pipe()
    status_r, status_w = os.pipe()
    _grow_pipe(out_w)
    null = os.open(os.devnull, os.O_RDONLY)

    def body() -> None:
        # lstat, resolved inside the chroot: a symlink named by the path is sent as the link
        # itself (like `docker cp` / `cp -a`); "/link/" or "/dir/." resolve it (the kernel
        # follows a link before a trailing "/" or "/.").
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise TransferError(f"{path} does not exist") from None
        except NotADirectoryError:
            raise TransferError(f"{path}: not a directory (a '/' follows a file)") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
                or stat.S_ISLNK(st.st_mode)):
            raise TransferError(f"{path} is not a file, directory or symlink")
        os.write(3, b"K" + struct.pack("=I", 0))
        # the one top entry the host expects: the request's last component ("." = contents)
        name = posixpath.basename(path.rstrip("/")) or "."
        # a TarFile only for gettarinfo (owner names, hard-link bookkeeping); the archive
        # itself is written by _send_tree straight to fd 1
        tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT)
        out = _ArchiveOut(1)
        _send_tree(tar, path, name, out)
        out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive
        out.flush()

    try:
        _fork_chrooted(reaper, root, null, out_w, status_w, body)
    finally:
        for fd in (out_w, status_w, null):
            os.close(fd)
    # The helper reports K (path found) before streaming, or E and exits.
    first = b""
    while len(first) < 5 and (more := os.read(status_r, 5 - len(first))):
        first += more
    if first[:1] != b"K":
        rest = first
        while chunk := os.read(status_r, 65536):
            rest += chunk
        os.close(status_r)
        os.close(out_r)
        msg = "the file-transfer helper died unexpectedly"
        if rest[:1] == b"E":
            (n,) = struct.unpack("=I", rest[1:5])
            msg = rest[5 : 5 + n].decode(errors="replace")
        raise TransferError(f"download {path}: {msg}")

    def stream() -> Iterator[bytes]:
        try:
            while chunk := os.read(out_r, CHUNK):
                yield chunk
            tail = b""
            while more := os.read(status_r, 65536):
                tail += more
            if tail[:1] == b"E":
                (n,) = struct.unpack("=I", tail[1:5])
                raise TransferError(f"download {path}: {tail[5 : 5 + n].decode(errors='replace')}")
        finally:
            os.close(out_r)
            os.close(status_r)

    return stream()
