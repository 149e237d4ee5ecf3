"""Content-addressed blob store: HOME/images/blobs/sha256/<hex>.

Why content addressing: two images sharing a base layer store it once, an interrupted import
leaves only complete, verified blobs (a blob is a cache, never a half-written file), and a blob
damaged on disk is caught by re-hashing on read instead of turning into a strange rootfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..diskspace import GuardedWriter, ensure_free
from ..errors import ImageError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1024 * 1024


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise ImageError.

    Digests come from untrusted manifests and become file names: checking the shape here is
    what keeps ``sha256:../../x`` from ever reaching the file system.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImageError(f"malformed digest {digest!r}: expected 'sha256:' + 64 hex digits")
    return digest


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _VerifyingReader(io.RawIOBase):
    """Hashes what is read; at EOF compares with the expected digest and raises if it differs.

    Streaming verification: a 1 GB layer is checked while it is unpacked, not read twice.
    """

    def __init__(self, fh: BinaryIO, digest: str) -> None:
        super().__init__()
        self._fh = fh
        self._digest = digest
        self._hash = hashlib.sha256()
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._fh.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._hash.update(memoryview(buffer)[:n])
        elif not self._done:
            self._done = True
            got = "sha256:" + self._hash.hexdigest()
            if got != self._digest:
                raise ImageError(
                    f"blob {self._digest} is corrupt (expected {self._digest}, got {got}); "
                    "re-import the image"
                )
        return n or 0

    def drain(self) -> None:
        """Read to the end, so the digest check runs even if the consumer stopped early."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._fh.close()
        super().close()


class BlobStore:
    """Blobs of one runtime home. Safe for concurrent writers: every write is temp + rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "sha256"
        self.tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        return self.dir / check_digest(digest).split(":", 1)[1]

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def put_stream(self, fileobj: BinaryIO, expected_digest: str | None = None,
                   size_hint: int | None = None) -> tuple[str, int]:
        """Copy ``fileobj`` into the store; return (digest, size).

        The data is hashed while it is written to a temp file, compared with
        ``expected_digest`` (ImageError on mismatch, nothing kept), then renamed into place.
        ``size_hint`` (bytes, from a descriptor) is checked against the free space first;
        either way the free space is re-checked as the stream is written, so a source that
        never ends (or lies about its size) stops with DiskSpaceError, not a full disk.
        """
        if expected_digest is not None:
            check_digest(expected_digest)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        what = f"blob {expected_digest or '(unknown digest)'}"
        if size_hint is not None and size_hint > 0:
            ensure_free(self.tmp, size_hint, what)
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as raw_out:
                out = GuardedWriter(raw_out, self.tmp, what)
                while chunk := fileobj.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + h.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise ImageError(
                    f"blob {expected_digest} does not match its content (got {digest}); "
                    "the image archive is damaged: export it again"
                )
            final = self.path(digest)
            os.chmod(tmp_name, 0o444)
            if final.exists():
                os.unlink(tmp_name)
            else:
                os.replace(tmp_name, final)
            return digest, size
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def put_bytes(self, data: bytes, expected_digest: str | None = None) -> tuple[str, int]:
        return self.put_stream(io.BytesIO(data), expected_digest)

    @contextlib.contextmanager
    def open(self, digest: str) -> Iterator[BinaryIO]:
        """Open a blob for streaming reads; the sha256 is checked when the reader hits EOF.

        On leaving the block the rest is drained, so a consumer that stops early (tarfile
        stops at the end-of-archive marker) still gets the check.
        """
        path = self.path(digest)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the reader
        except FileNotFoundError:
            raise ImageError(
                f"blob {digest} is missing from {self.dir}; re-import the image"
            ) from None
        reader = _VerifyingReader(fh, digest)
        buffered = io.BufferedReader(reader, CHUNK)
        try:
            yield buffered  # type: ignore[misc]
            reader.drain()
        finally:
            buffered.close()

    def read_bytes(self, digest: str) -> bytes:
        with self.open(digest) as fh:
            return fh.read()

    def verify(self, digest: str) -> None:
        with self.open(digest):
            pass

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def digests(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted("sha256:" + p.name for p in self.dir.iterdir() if len(p.name) == 64)
