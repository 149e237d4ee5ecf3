"""Upload/Download as tar streams, confined to the container root.

Why fork + chroot: path resolution (.., absolute symlinks, symlinked parents) then happens
*inside* the container by construction, like `docker cp`; the per-member checks below
additionally reject archives that try to leave the target directory or write through links.
"""

from __future__ import annotations

import os
import posixpath
import stat
import struct
import tarfile
from collections.abc import Iterable, Iterator

from .pid1 import Reaper

CHUNK = 256 * 1024


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


def _extract(target_dir: str) -> int:
    """Runs in the chrooted child: tar on fd 0, extracted under target_dir."""
    os.makedirs(target_dir, exist_ok=True)
    os.chdir(target_dir)
    count = 0
    with os.fdopen(0, "rb", closefd=False) as src, tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            rel = _check_name(member.name, "member")
            if member.islnk():
                link = _check_name(member.linkname, f"hard link target of {rel!r}")
                # tarfile resolves hard-link targets relative to the extraction dir
                member.linkname = link
            if member.ischr() or member.isblk():
                raise TransferError(f"member {rel!r} is a device node; refused")
            _no_symlinked_parent(rel)
            if rel != "." and os.path.islink(rel) and not member.isdir():
                os.unlink(rel)  # never write through an existing symlink
            member.name = rel
            tar.extract(member, path=".", set_attrs=True, numeric_owner=True)
            count += 1
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


def upload(reaper: Reaper, root: str, target_dir: str, chunks: Iterable[bytes]) -> int:
    if not target_dir.startswith("/"):
        raise TransferError(f"target_dir {target_dir!r} must be an absolute container path")
    data_r, data_w = os.pipe()
    status_r, status_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)

    def body() -> None:
        count = _extract(target_dir)
        os.write(3, b"K" + struct.pack("=I", count))

    try:
        _fork_chrooted(reaper, root, data_r, null, status_w, body)
    finally:
        for fd in (data_r, status_w, null):
            os.close(fd)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(data_w, view) :]
    except BrokenPipeError:
        pass  # the helper refused the archive; its reason is on the status pipe
    finally:
        os.close(data_w)
    try:
        kind, value = _read_result(status_r)
    finally:
        os.close(status_r)
    if kind == "E":
        raise TransferError(f"upload to {target_dir}: {value}")
    return int(value)


def download(reaper: Reaper, root: str, path: str) -> Iterator[bytes]:
    if not path.startswith("/"):
        raise TransferError(f"path {path!r} must be an absolute container path")
    out_r, out_w = os.pipe()
    status_r, status_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)

    def body() -> None:
        # lstat, resolved inside the chroot: a symlink named by the path is sent as the link
        # itself (like `docker cp` / `cp -a`); "/link/" or "/dir/." resolve it (the kernel
        # follows a link before a trailing "/" or "/.").
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
                or stat.S_ISLNK(st.st_mode)):
            raise TransferError(f"{path} is not a file, directory or symlink")
        os.write(3, b"K" + struct.pack("=I", 0))
        # the one top entry the host expects: the request's last component ("." = contents)
        name = posixpath.basename(path.rstrip("/")) or "."
        with os.fdopen(1, "wb", closefd=False) as dst, tarfile.open(
            fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT
        ) as tar:
            tar.add(path, arcname=name)

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
