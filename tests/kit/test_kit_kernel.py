"""bzImage → vmlinux unpacking on a synthetic bzImage laid out like the kernel's."""

from __future__ import annotations

import lzma
import struct

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.kit.kernel import extract_vmlinux, payload_format

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def fake_bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    pad = b"\xcc" * 100  # decompressor code before the payload
    struct.pack_into("<II", setup, 0x248, len(pad), len(payload))
    return bytes(setup) + pad + payload + struct.pack("<I", len(ELF)) + b"\0" * 32


def test_xz_payload_with_x86_bcj_filter_like_the_kernel_build() -> None:
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
    payload = lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    image = fake_bzimage(payload)
    assert payload_format(image)[0] == "xz"
    assert extract_vmlinux(image) == ELF


def test_gzip_payload() -> None:
    import gzip

    assert extract_vmlinux(fake_bzimage(gzip.compress(ELF))) == ELF


def test_not_a_bzimage() -> None:
    with pytest.raises(ImageError, match="bzImage"):
        extract_vmlinux(b"\0" * 4096)
