"""The guest kernel: unpack Debian's bzImage to the ELF vmlinux QEMU can boot directly.

Why uncompressed: under TCG the guest CPU is emulated, so the bzImage's own decompressor
(xz, ~8 MiB → ~60 MiB) runs slowly. Measured launch → first line of /init, median of 5, on the
2-core dev machine: q35 + bzImage 7.7 s, q35 + ELF vmlinux (PVH entry, CONFIG_PVH=y) 3.5 s.
QEMU loads an ELF with a Xen PVH note itself, skipping the real-mode setup and decompressor.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

from .. import tools
from ..errors import ImageError
from ..fscopy import copy_file

#: payload magic → format name, as the kernel's boot/compressed Makefile writes them
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
)


def payload_format(bzimage: bytes) -> tuple[str, bytes]:
    """Return (format, compressed payload) of an x86 bzImage, from its setup header.

    The header's payload_offset/payload_length (boot protocol ≥ 2.08) locate the payload
    exactly, which is safer than searching for a magic that may occur in setup code.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("kernel image is not an x86 bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[start + payload_offset : start + payload_offset + payload_length]
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name, payload
    raise ImageError(f"unknown kernel payload compression (magic {payload[:6].hex()})")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the bzImage payload into the ELF vmlinux."""
    fmt, payload = payload_format(bzimage)
    if fmt == "xz":
        # The payload is followed by a 4-byte size; the decompressor stops at the stream end.
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif fmt == "gzip":
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:  # zstd: not in the 3.11 stdlib, use the zstd program
        zstd = tools.require_tool("zstd", package="zstd", why="unpack a zstd-compressed kernel")
        data = tools.run([zstd, "-d", "-c", "-q"], input=payload[:-4]).stdout
    if data[:4] != b"\x7fELF":
        raise ImageError("decompressed kernel payload is not an ELF vmlinux")
    return data


def write_kernel(bzimage_path: Path, target: Path, uncompressed: bool) -> Path:
    """Write the kernel QEMU will get with -kernel: the ELF vmlinux, or the bzImage as is."""
    if uncompressed:
        target.write_bytes(extract_vmlinux(bzimage_path.read_bytes()))
    else:
        copy_file(bzimage_path, target, "guest kit kernel", preserve=False)
    return target


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, for the guest's `tsc_early_khz=`.

    Under TCG the guest reads the host TSC; on `-machine microvm` the kernel's calibration
    against the PIT fails or hangs (2-4 of 5 boots hung without it), so we tell it the rate.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return int(float(line.split(":", 1)[1]) * 1000)
            except ValueError:
                return None
    return None
