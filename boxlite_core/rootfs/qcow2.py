"""Two facts read straight from a qcow2 header: the virtual size and the backing file.

Why not ``qemu-img info``: both are read at every start (the boot template key) and for
every box when a snapshot's dependants are listed; a 32-byte read beats a process. The
offsets are the qcow2 specification's (QEMU docs/interop/qcow2.txt, "Header"): magic
``QFI\\xfb`` at 0, backing_file_offset u64 at 8, backing_file_size u32 at 16, size u64 at 24,
all big-endian.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..tools import require_tool, run

MAGIC = b"QFI\xfb"
#: a longer backing name is not a qcow2 QEMU would write (its limit is 1023 bytes)
MAX_BACKING_NAME = 1023


def create_overlay(
    overlay: Path, backing: Path, backing_format: str, size: int, *, open_backing: bool = True,
    why: str = "create a qcow2 overlay",
) -> None:
    """Create ``overlay``, a qcow2 of ``size`` bytes over ``backing`` (``backing_format``
    "raw" or "qcow2"), atomically (``NAME.tmp``, then renamed; the temp file goes on
    failure). ``open_backing=False`` is ``qemu-img -u``: the backing is not read, for one a
    running VM may be writing.

    Raises:
        ToolMissingError: no qemu-img (package qemu-utils). EngineError: it failed or took
            longer than 120 s.
    """
    qemu_img = require_tool("qemu-img", why=why)
    tmp = overlay.with_name(overlay.name + ".tmp")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", *(() if open_backing else ("-u",)),
            "-b", str(backing), "-F", backing_format, str(tmp), str(size)]
    try:
        run(argv, timeout=120)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, overlay)


def _header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        header = fh.read(32)
    if len(header) < 32 or header[:4] != MAGIC:
        raise ConfigError(f"disk {path}: not a qcow2 image (no QFI\\xfb magic)")
    return header


def virtual_size(path: Path) -> int:
    """The disk size the guest sees, bytes.

    Raises:
        OSError: the file cannot be read. ConfigError: not a qcow2 file.
    """
    return int.from_bytes(_header(Path(path))[24:32], "big")


def backing_file(path: Path) -> Path | None:
    """The backing file named in the header (relative names resolved against the image's
    directory, as QEMU does), or None for an image without one.

    Raises:
        OSError: the file cannot be read. ConfigError: not a qcow2 file, or a corrupt name.
    """
    path = Path(path)
    header = _header(path)
    offset = int.from_bytes(header[8:16], "big")
    size = int.from_bytes(header[16:20], "big")
    if offset == 0 or size == 0:
        return None
    if size > MAX_BACKING_NAME:
        raise ConfigError(f"disk {path}: backing file name of {size} bytes")
    with open(path, "rb") as fh:
        fh.seek(offset)
        name = os.fsdecode(fh.read(size))
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


class ChainError(ConfigError):
    """A backing chain that cannot be followed to its end (unreadable link, too deep)."""


def chain(path: Path, limit: int = 64, *, strict: bool = False) -> list[Path]:
    """``path`` and every backing file below it, top first, while they are qcow2 (the last
    may be a raw base). Stops at ``limit`` links or a file that cannot be read, or with
    ``strict`` raises :class:`ChainError` there instead (a caller deciding whether a disk may
    be deleted must not take a chain it could not read for one that does not reach it)."""
    out = [Path(path)]
    current: Path | None = Path(path)
    while current is not None:
        if len(out) > limit:
            if strict:
                raise ChainError(f"disk {path}: backing chain longer than {limit} links")
            break
        try:
            current = backing_file(current)
        except OSError as exc:
            if strict:
                raise ChainError(f"disk {path}: cannot read {current} ({exc})") from None
            break
        except ConfigError:
            break  # not a qcow2: a raw base, the chain's end
        if current is None:
            break
        out.append(current)
    return out
