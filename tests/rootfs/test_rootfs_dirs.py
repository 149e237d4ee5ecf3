"""The share-based strategies: ``merged`` (one dir per box) and ``layers`` (overlayfs parts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from boxlite_core.rootfs.base import GuestShare, LayersRootfs
from boxlite_core.rootfs.layers import LayersStrategy, layer_cache_dir
from boxlite_core.rootfs.merged import MergedStrategy
from boxlite_testing.ext4 import debugfs

is_root = os.geteuid() == 0


def test_merged_applies_layers_and_shares_dir(ctx, two_layer_image, tmp_path: Path):
    box = tmp_path / "box"
    art = MergedStrategy().prepare(two_layer_image, box, ctx)
    root = box / "rootfs"
    assert art.guest == GuestShare("rootfs")
    assert [s.to_dict() for s in art.shares] == [
        {"tag": "rootfs", "host_path": str(root), "read_only": False, "uid": None, "gid": None}
    ]
    assert MergedStrategy.needs_sharer
    assert (root / "etc/keep").read_text() == "k"
    assert not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "opt")) == ["c"]
    assert (root / "bin/suid").stat().st_mode & 0o7777 == 0o4755


def test_merged_idempotent_keeps_writes_and_remove(ctx, two_layer_image, tmp_path: Path):
    box = tmp_path / "box"
    MergedStrategy().prepare(two_layer_image, box, ctx)
    (box / "rootfs/etc/keep").write_text("changed by the box")
    MergedStrategy().prepare(two_layer_image, box, ctx)
    assert (box / "rootfs/etc/keep").read_text() == "changed by the box"
    MergedStrategy().remove(box)
    assert not (box / "rootfs").exists() and box.exists()


def test_merged_rebuilds_after_interrupted_build(ctx, two_layer_image, tmp_path: Path):
    box = tmp_path / "box"
    (box / "rootfs").mkdir(parents=True)  # a crash left a dir but no ready marker
    MergedStrategy().prepare(two_layer_image, box, ctx)
    assert (box / "rootfs/etc/keep").exists()


@pytest.mark.skipif(not is_root, reason="overlayfs whiteouts (char 0/0, trusted xattr) need root")
def test_layers_per_layer_dirs_upper_disk(ctx, two_layer_image, tmp_path: Path):
    box = tmp_path / "box"
    art = LayersStrategy().prepare(two_layer_image, box, ctx)
    cache = layer_cache_dir(ctx.home)
    lower_dir = cache / two_layer_image.layers[0].digest[7:]
    upper_dir = cache / two_layer_image.layers[1].digest[7:]
    assert art.guest == LayersRootfs((GuestShare("layer0"), GuestShare("layer1")), "bxupper")
    assert [(s.tag, s.host_path, s.read_only) for s in art.shares] == [
        ("layer0", lower_dir, True),
        ("layer1", upper_dir, True),
    ]
    assert [(d.path, d.format, d.serial) for d in art.disks] == [
        (box / "upper.ext4", "raw", "bxupper")
    ]
    assert (lower_dir / "etc/gone").read_text() == "g"
    gone = os.lstat(upper_dir / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(upper_dir / "opt", "trusted.overlay.opaque") == b"y"
    listing = debugfs(box / "upper.ext4", "ls /")
    assert "upper" in listing and "work" in listing
    # idempotent; second box shares the cached layer dirs; remove keeps caches
    (box / "upper.ext4").write_bytes((box / "upper.ext4").read_bytes()[:4096] + b"x")
    size = (box / "upper.ext4").stat().st_size
    LayersStrategy().prepare(two_layer_image, box, ctx)
    assert (box / "upper.ext4").stat().st_size == size
    art2 = LayersStrategy().prepare(two_layer_image, tmp_path / "box2", ctx)
    assert art2.shares == art.shares
    LayersStrategy().remove(box)
    assert not (box / "upper.ext4").exists() and lower_dir.exists()


def test_layers_busybox(ctx, store, tmp_path: Path):
    image = store.get("busybox")
    art = LayersStrategy().prepare(image, tmp_path / "box", ctx)
    (share,) = art.shares
    assert os.readlink(share.host_path / "bin/sh") == "/bin/busybox"
    assert not [p for p in layer_cache_dir(ctx.home).iterdir() if p.name.startswith("build-")]
