"""Layer compression: which codec a layer blob uses, its decoded tar stream, and the check
that a blob decodes at all — made when an image comes in, not when a box first unpacks it.

The codec is read from the blob's first bytes, not from its media type: ``docker save``
archives carry no media types and some registries label layers loosely; the bytes do not lie.
gzip is the standard library's; zstd (``application/vnd.oci.image.layer.v1.tar+zstd``, OCI
image spec, media-types.md) is the ``zstandard`` package, a declared dependency.

A leaf below :mod:`.layers` and :mod:`.importers`: it knows blobs and bytes, never the index.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import zstandard

from ..errors import ImageError
from .oci import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD

if TYPE_CHECKING:
    from .blobs import BlobStore

GZIP_MAGIC = b"\x1f\x8b"
#: RFC 8878 section 3.1.1 (a zstd frame); skippable frames (3.1.2) lead with 0x184D2A5?
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE_LOW = 0x184D2A50
#: what a broken stream raises while it is decoded (each codec its own, and tarfile's)
DECODE_ERRORS = (
    tarfile.TarError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    zstandard.ZstdError,
)
_CHUNK = 1024 * 1024


def sniff_media_type(head: bytes) -> str:
    """The OCI layer media type for a blob starting with ``head`` (at least 4 bytes when
    the blob has them): tar+gzip, tar+zstd, else plain tar."""
    if head[:2] == GZIP_MAGIC:
        return OCI_LAYER_GZIP
    if head[:4] == ZSTD_MAGIC or _is_zstd_skippable(head):
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def _is_zstd_skippable(head: bytes) -> bool:
    # zstd:chunked and seekable zstd may open with a skippable frame (RFC 8878 3.1.2)
    return len(head) >= 4 and int.from_bytes(head[:4], "little") & ~0xF == _ZSTD_SKIPPABLE_LOW


@contextlib.contextmanager
def decompressed(fh: BinaryIO, layer_name: str) -> Iterator[BinaryIO]:
    """Yield the uncompressed tar stream of a layer, whatever its compression.

    ``fh`` must offer ``peek`` (an ``io.BufferedReader``) so the codec can be read without
    consuming bytes; it stays open. A zstd layer is read across all its frames (zstd:chunked
    writes one per file), skippable frames included.
    """
    peek = getattr(fh, "peek", None)
    head = peek(4)[:4] if peek else b""
    kind = sniff_media_type(head)
    if kind == OCI_LAYER_GZIP:
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            yield gz  # type: ignore[misc]
    elif kind == OCI_LAYER_ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(
            fh, read_across_frames=True, closefd=False
        )
        with reader:
            yield reader  # type: ignore[misc]
    else:
        yield fh


class _Hashing(io.RawIOBase):
    """Passes reads through and hashes them: the decoded bytes' sha256 is the diff ID."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self._fh = fh
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._fh.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        return n


def check_layer(blobs: BlobStore, digest: str, diff_id: str | None, label: str) -> str:
    """Decode the layer blob ``digest`` to its end and read it as a tar; return its diff ID
    (``sha256:`` of the decoded bytes, OCI image spec config.md ``rootfs.diff_ids``).

    Why at import/pull time: a layer that cannot be decoded would otherwise be found only
    when a box first unpacks it, and that start would fail. ``diff_id`` (from the image
    config) is compared when given, as containerd does when it unpacks.

    Raises:
        ImageError: the blob does not decode (corrupt or truncated gzip/zstd, not a tar), or
            its decoded digest is not ``diff_id``; the message names ``label`` and the layer.
    """
    what = f"{label}: layer {digest}"
    try:
        with blobs.open(digest) as fh, decompressed(fh, digest) as stream:
            hashing = _Hashing(stream)
            buffered = io.BufferedReader(hashing, _CHUNK)
            with tarfile.open(fileobj=buffered, mode="r|") as tar:
                for _member in tar:
                    pass  # tarfile reads past each member's data: every byte is decoded
            while buffered.read(_CHUNK):  # the end-of-archive padding belongs to the diff ID
                pass
            got = "sha256:" + hashing.hash.hexdigest()
    except DECODE_ERRORS as exc:
        kind = sniff_media_type(_head(blobs, digest)).rpartition(".")[2]
        raise ImageError(
            f"{what} cannot be decoded ({kind}: {exc}); the image is damaged: "
            "export or push it again"
        ) from exc
    if diff_id is not None and got != diff_id:
        raise ImageError(
            f"{what} decodes to {got} but the image config expects {diff_id}; the image is "
            "damaged: export or push it again"
        )
    return got


def _head(blobs: BlobStore, digest: str) -> bytes:
    with open(blobs.path(digest), "rb") as fh:
        return fh.read(4)
