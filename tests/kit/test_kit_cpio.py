"""The initramfs cpio writer, checked with a real cpio reader (busybox cpio)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from boxlite_core import tools
from boxlite_core.kit.cpio import CpioWriter
from boxlite_core.kit.initramfs import build_initramfs, init_script


def _archive() -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf) as cpio:
        cpio.add_dir("bin")
        cpio.add_file("bin/hello", b"hello world\n", perm=0o755)
        cpio.add_file("odd", b"x" * 5)  # length not a multiple of 4: padding must be right
        cpio.add_symlink("bin/sh", "hello")
        cpio.add_dir("dev")
        cpio.add_chardev("dev/console", 5, 1)
    return buf.getvalue()


def test_busybox_cpio_lists_every_entry() -> None:
    busybox = tools.require_tool("busybox")
    out = tools.run([busybox, "cpio", "-t"], input=_archive()).stdout.decode().split()
    assert out == ["bin", "bin/hello", "odd", "bin/sh", "dev", "dev/console"]


def test_busybox_cpio_extracts_content_modes_and_links(tmp_path: Path) -> None:
    busybox = tools.require_tool("busybox")
    tools.run([busybox, "cpio", "-i", "-d", "-m"], input=_archive(), cwd=tmp_path)
    assert (tmp_path / "bin/hello").read_bytes() == b"hello world\n"
    assert (tmp_path / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "bin/sh").readlink() == Path("hello")
    listing = tools.run([busybox, "cpio", "-t", "-v"], input=_archive()).stdout.decode()
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("c")


def test_archive_ends_with_trailer_and_is_aligned() -> None:
    data = _archive()
    assert data.startswith(b"070701")
    assert b"TRAILER!!!\0" in data[-128:]
    assert len(data) % 4 == 0


def test_init_script_is_valid_shell_and_loads_modules_in_order() -> None:
    busybox = tools.require_tool("busybox")
    script = init_script(["a/dep.ko", "b/user.ko"])
    proc = subprocess.run([busybox, "sh", "-n"], input=script.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert script.splitlines()[1].startswith("# boxlite")
    assert 'echo "boxlite-init: start"' in script.splitlines()[2]
    assert "for m in a/dep.ko b/user.ko; do" in script
    assert "boxlite.init=marker" in script
    assert "exec switch_root /newroot /usr/bin/python3 -m boxlite_core.agent" in script


def test_initramfs_holds_busybox_modules_and_init(tmp_path: Path) -> None:
    busybox = Path(tools.require_tool("busybox"))
    modroot = tmp_path / "mods"
    (modroot / "kernel/fs").mkdir(parents=True)
    (modroot / "kernel/fs/x.ko").write_bytes(b"\x7fELF fake")
    target = tmp_path / "initrd.img"
    build_initramfs(target, busybox, modroot, ["kernel/fs/x.ko"])
    names = tools.run([str(busybox), "cpio", "-t"], input=target.read_bytes()).stdout.split()
    for expected in (
        b"init",
        b"bin/busybox",
        b"bin/sh",
        b"dev/console",
        b"lib/modules/kernel/fs/x.ko",
        b"newroot",
    ):
        assert expected in names
