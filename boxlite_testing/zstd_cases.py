"""A two-layer image for zstd tests (import, pull, VM), and damaged variants of a layer.

LOWER + UPPER hold a file spanning several zstd blocks, an executable, a whiteout, a
symlink and a hardlink, so a decoder that stops early or a mangled member shows.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from .oci import ZSTD_MAGIC, d, f, hard, layer_tar, sym, zstd_compress

ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
BIG = os.urandom(300_000)  # incompressible: spans several zstd blocks
LOWER = layer_tar(
    [d("etc"), f("etc/os", "zstd lower\n"), f("etc/gone", "x"), d("opt"),
     f("opt/tool", "#!/bin/sh\necho tool\n", mode=0o755), f("opt/big.bin", BIG)]
)  # fmt: skip
UPPER = layer_tar(
    [f("etc/os", "zstd upper\n"), f("etc/.wh.gone"), sym("opt/link", "tool"),
     hard("opt/again", "opt/tool")]
)  # fmt: skip


def check_tree(root: Path) -> None:
    """LOWER then UPPER, applied under ``root``: what every unpack must show."""
    assert (root / "etc" / "os").read_text() == "zstd upper\n"
    assert not (root / "etc" / "gone").exists()
    assert (root / "opt" / "big.bin").read_bytes() == BIG
    assert (root / "opt" / "tool").stat().st_mode & 0o777 == 0o755
    assert os.readlink(root / "opt" / "link") == "tool"
    assert (root / "opt" / "again").stat().st_ino == (root / "opt" / "tool").stat().st_ino


def damaged_layers() -> list[tuple[str, bytes, str]]:
    """(label, blob, error it must raise) for a blob standing in for UPPER (whose diff ID
    the config keeps)."""
    good = zstd_compress(LOWER)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    return [
        ("truncated-zstd", good[: len(good) // 2], "cannot be decoded"),
        ("corrupt-zstd", bytes(flipped), "cannot be decoded"),
        ("zstd-magic-then-junk", ZSTD_MAGIC + b"\x00" * 200, "cannot be decoded"),
        ("zstd-of-not-a-tar", zstd_compress(b"this is not a tar archive\n" * 50),
         "cannot be decoded"),
        ("truncated-gzip", gzip.compress(LOWER)[:-40], "cannot be decoded"),
        ("zstd-of-another-tar", zstd_compress(layer_tar([f("other", "x")])), "config expects"),
        ("junk-plain", b"\x01junk" * 300, "cannot be decoded"),
    ]  # fmt: skip
