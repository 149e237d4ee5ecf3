"""The default rootfs strategy: cached ext4 base + per-box qcow2 overlay (real mkfs/qemu-img)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.rootfs import qcow2
from boxlite_core.rootfs.base import DiskRootfs
from boxlite_core.rootfs.disk import OVERLAY_VIRTUAL_MIB, DiskStrategy, base_image_path, ensure_base
from boxlite_core.tools import find_tool, require_tool
from boxlite_testing.ext4 import debugfs

is_root = os.geteuid() == 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(overlay: Path, command: str) -> str:
    qio = find_tool("qemu-io")
    if qio is None:
        pytest.skip("qemu-io (qemu-utils) not installed")
    out = subprocess.run(
        [qio, "-f", "qcow2", "-c", command, str(overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_busybox_base_has_sh_and_artifact_shape(ctx, store, tmp_path: Path):
    image = store.get("busybox")
    art = DiskStrategy().prepare(image, tmp_path / "box", ctx)
    overlay = tmp_path / "box" / "rootfs.qcow2"
    assert art.guest == DiskRootfs("bxrootfs", "ext4")
    assert [d.to_dict() for d in art.disks] == [
        {"path": str(overlay), "format": "qcow2", "read_only": False, "serial": "bxrootfs"}
    ]
    assert art.shares == ()
    base = base_image_path(ctx.home, image.digest)
    assert base.stat().st_mode & 0o777 == 0o444
    assert 'Fast link dest: "/bin/busybox"' in debugfs(base, "stat /bin/sh")
    assert "Mode:  0755" in debugfs(base, "stat /bin/busybox")
    listing = debugfs(base, "ls -l /bin")
    assert " busybox" in listing and " sh" in listing
    info = json.loads(
        subprocess.run(
            [require_tool("qemu-img"), "info", "--output=json", str(overlay)],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base.resolve())
    # every image's overlay has one size, so one boot template serves them all
    assert info["virtual-size"] == OVERLAY_VIRTUAL_MIB * 1024 * 1024 > base.stat().st_size
    # the header reader the template key uses agrees with qemu-img
    assert qcow2.virtual_size(overlay) == info["virtual-size"]
    assert qcow2.backing_file(overlay) == base.resolve()
    assert qcow2.chain(overlay) == [overlay, base.resolve()]
    with pytest.raises(ConfigError, match="not a qcow2"):  # the raw base
        qcow2.backing_file(base)


def test_base_unchanged_after_box_writes(ctx, store, tmp_path: Path):
    image = store.get("busybox")
    DiskStrategy().prepare(image, tmp_path / "box", ctx)
    base = base_image_path(ctx.home, image.digest)
    before = sha256(base)
    overlay = tmp_path / "box" / "rootfs.qcow2"
    qemu_io(overlay, "write -P 0xab 0 64k")
    assert "read 65536/65536" in qemu_io(overlay, "read -P 0xab 0 64k")
    assert sha256(base) == before


def test_prepare_is_idempotent_keeps_box_writes(ctx, store, tmp_path: Path):
    image = store.get("busybox")
    strategy = DiskStrategy()
    strategy.prepare(image, tmp_path / "box", ctx)
    overlay = tmp_path / "box" / "rootfs.qcow2"
    qemu_io(overlay, "write -P 0x5a 1M 64k")
    strategy.prepare(image, tmp_path / "box", ctx)
    assert "read 65536/65536" in qemu_io(overlay, "read -P 0x5a 1M 64k")


def test_second_box_reuses_base_and_disk_size(ctx, store, tmp_path: Path):
    import attrs

    image = store.get("busybox")
    DiskStrategy().prepare(image, tmp_path / "b1", ctx)
    base = base_image_path(ctx.home, image.digest)
    mtime = base.stat().st_mtime_ns
    big = attrs.evolve(ctx, disk_size_mib=512)
    DiskStrategy().prepare(image, tmp_path / "b2", big)
    assert base.stat().st_mtime_ns == mtime
    info = json.loads(
        subprocess.run(
            [require_tool("qemu-img"), "info", "--output=json", str(tmp_path / "b2/rootfs.qcow2")],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["virtual-size"] == 512 * 1024 * 1024


def test_concurrent_builders_make_one_base(ctx, store):
    image = store.get("busybox")
    results: list[Path] = []
    errors: list[BaseException] = []

    def build():
        try:
            results.append(ensure_base(image, ctx))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    cache = results[0].parent
    assert sorted(p.suffix for p in cache.iterdir()) == [".ext4", ".lock"]


def test_layers_whiteouts_and_owners_in_base(ctx, two_layer_image, tmp_path: Path):
    DiskStrategy().prepare(two_layer_image, tmp_path / "box", ctx)
    base = base_image_path(ctx.home, two_layer_image.digest)
    etc = debugfs(base, "ls /etc")
    assert "keep" in etc and "gone" not in etc
    opt = debugfs(base, "ls /opt")
    assert "c" in opt.split() and "a" not in opt.split()
    stat = debugfs(base, "stat /bin/suid")
    assert "Mode:  04755" in stat
    if is_root:
        assert "User:  1000" in stat


def test_remove_deletes_only_box_artifacts(ctx, store, tmp_path: Path):
    image = store.get("busybox")
    DiskStrategy().prepare(image, tmp_path / "box", ctx)
    (tmp_path / "box" / "other").write_text("keep")
    DiskStrategy().remove(tmp_path / "box")
    assert not (tmp_path / "box" / "rootfs.qcow2").exists()
    assert (tmp_path / "box" / "other").exists()
    assert base_image_path(ctx.home, image.digest).exists()
