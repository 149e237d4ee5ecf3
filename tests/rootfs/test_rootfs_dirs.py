"""The share-based strategies: ``merged`` (one dir per box) and ``layers`` (overlayfs parts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from boxlite_core.images.oci import chain_keys
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
    chain = chain_keys([layer.digest for layer in two_layer_image.layers])
    lower_dir, upper_dir = (cache / key[7:] for key in chain)
    assert chain[0] == two_layer_image.layers[0].digest, "the bottom layer is its own chain"
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
    assert os.getxattr(upper_dir / "opt", "user.overlay.opaque") == b"y"
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


def _import(store, tmp_path: Path, name: str, layers: list[bytes]):
    from boxlite_testing.oci import oci_layout_files, write_dir

    files = oci_layout_files(layers, ref=name, gzip_layers=False)
    return store.import_path(write_dir(files, tmp_path / name.replace(":", "_")))


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay-form layers need root")
def test_a_layer_dir_is_cached_per_chain(ctx, store, tmp_path: Path):
    """One top layer (a hardlink to a lower file) on two different bases: its directory holds
    the copied-up file of *its* base, so the cache is per chain, not per layer digest."""
    from boxlite_testing.oci import d, f, hard, layer_tar

    top = layer_tar([hard("etc/link", "etc/base")])
    one = _import(store, tmp_path, "one:1", [layer_tar([d("etc"), f("etc/base", "one")]), top])
    two = _import(store, tmp_path, "two:1", [layer_tar([d("etc"), f("etc/base", "two")]), top])
    assert one.layers[1].digest == two.layers[1].digest
    dirs = [
        [s.host_path for s in LayersStrategy().prepare(img, tmp_path / name, ctx).shares]
        for img, name in ((one, "b1"), (two, "b2"))
    ]
    assert dirs[0][1] != dirs[1][1]
    assert [(x[1] / "etc/link").read_text() for x in dirs] == ["one", "two"]
    # removing one image removes its chain's directories, never the other image's
    store.remove("one:1")
    assert not dirs[0][0].exists() and not dirs[0][1].exists()
    assert dirs[1][0].exists() and dirs[1][1].exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay-form layers need root")
def test_layers_below_an_opaque_root_are_left_out(ctx, store, tmp_path: Path):
    """overlayfs ignores an opaque mark on a layer's root, so the stack starts at it."""
    from boxlite_testing.oci import f, layer_tar

    image = _import(store, tmp_path, "opq:1", [
        layer_tar([f("a", "a")]), layer_tar([f(".wh..wh..opq"), f("b", "b")]),
        layer_tar([f("c", "c")]),
    ])  # fmt: skip
    art = LayersStrategy().prepare(image, tmp_path / "box", ctx)
    cache = layer_cache_dir(ctx.home)
    chain = chain_keys([layer.digest for layer in image.layers])
    assert [(s.tag, s.host_path) for s in art.shares] == [
        ("layer0", cache / chain[1][7:]),
        ("layer1", cache / chain[2][7:]),
    ]
    assert art.guest == LayersRootfs((GuestShare("layer0"), GuestShare("layer1")), "bxupper")
