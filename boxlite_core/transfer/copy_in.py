"""Copy-in, host side: a host file, directory or symlink as a tar stream for the agent.

Why a generator of our own rather than ``tarfile.add`` into a spool: copy-in used to write
the whole archive to a SpooledTemporaryFile (on disk past 8 MiB) before the first byte left
the host, then read it back. Here the archive is produced as the agent consumes it, one
MiB-sized chunk per gRPC message, with the host doing only header building (tarfile's
``gettarinfo``/``tobuf``: the same members, names and pax headers ``tarfile.add`` writes) and
one read per MiB of file data. The host holds at most one chunk.

Ownership in the archive is root (uid/gid 0): files copied into a container belong to its
root user (docker ``cp`` without ``-a``).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator

from .request import InRequest

#: bytes per chunk handed to gRPC (one UploadChunk each)
CHUNK = 1024 * 1024


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _Batch:
    """Gathers headers and small files into chunks of about CHUNK bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> bytes | None:
        """Add ``data``; returns a full chunk to send, or None."""
        self.parts.append(data)
        self.size += len(data)
        return self.take() if self.size >= CHUNK else None

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts, self.size = [], 0
        return out


def manifest(request: InRequest) -> bytes:
    """What the archive of ``request`` will hold, for the agent to refuse conflicts before it
    writes anything: member names in archive order, each prefixed by "d" (directory) or "f",
    NUL-separated (agent.proto UploadChunk.manifest). lstat only: no owner lookups."""
    st = os.lstat(request.path)
    if stat.S_ISSOCK(st.st_mode):
        return b""
    if not request.is_dir:
        return b"f" + os.fsencode(request.name)
    return b"\0".join(_dir_manifest(os.fspath(request.path), os.fsencode(request.name)))


def _dir_manifest(path: str, name: bytes) -> Iterator[bytes]:
    yield b"d" + name
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        sub = name + b"/" + os.fsencode(entry.name)
        if entry.is_dir(follow_symlinks=False):
            yield from _dir_manifest(entry.path, sub)
        elif not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
            yield b"f" + sub


def tar_chunks(request: InRequest) -> Iterator[bytes]:
    """The archive of ``request`` (one top entry, ``request.name``) as chunks of ~1 MiB.

    Raises OSError as reading the host files does (one that shrinks while it is read:
    "changed while copying")."""
    tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT)
    batch = _Batch()
    for path, info in _walk(tar, os.fspath(request.path), request.name):
        for piece in _member(path, info, tar):
            if len(piece) >= CHUNK:
                if batch.size:
                    yield batch.take()
                yield piece
            elif (full := batch.add(piece)) is not None:
                yield full
    batch.add(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive
    yield batch.take()


def _walk(tar: tarfile.TarFile, path: str, arcname: str) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """The members ``tarfile.add(path, arcname)`` writes, in its order, root-owned."""
    info = tar.gettarinfo(path, arcname)
    if info is None:  # a socket: tarfile.add leaves it out too
        return
    yield path, _root_owned(info)
    if info.isdir():
        for entry in sorted(os.listdir(path)):
            yield from _walk(tar, os.path.join(path, entry), f"{arcname}/{entry}")


def _member(path: str, info: tarfile.TarInfo, tar: tarfile.TarFile) -> Iterator[bytes]:
    """One member's bytes: its header (pax where needed), then a file's data, padded."""
    yield info.tobuf(tarfile.PAX_FORMAT, tar.encoding, tar.errors)
    if not info.isreg():
        return
    with open(path, "rb", buffering=0) as fh:
        left = info.size
        while left > 0:
            data = fh.read(min(left, CHUNK))
            if not data:
                raise OSError(f"{path} changed while copying (shorter than {info.size} bytes)")
            left -= len(data)
            yield data
    if info.size % tarfile.BLOCKSIZE:
        yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)


__all__ = ["CHUNK", "manifest", "tar_chunks"]
