"""Snapshot records without a VM: names, what they keep alive, and their removal rules.

The rows and directories are the real ones (sqlite, qcow2 files made by qemu-img); only the
VM is absent, so these check the bookkeeping a user relies on when no box is running.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError, NotFoundError, StateError
from boxlite_core.models import BoxOptions
from boxlite_core.runtime import snapshots
from boxlite_core.runtime.snapshots import Snapshot
from boxlite_core.tools import find_tool

needs_qemu_img = pytest.mark.skipif(find_tool("qemu-img") is None, reason="needs qemu-img")


def _snap(rt, name: str, *, digest: str = "sha256:" + "ab" * 32, auto: bool = False) -> Snapshot:
    store = rt.services.snapshots
    snap = Snapshot(
        name=name, id=name + "-id", box_id="b" * 12, box_name="src", backend="qemu",
        created_at=time.time(), directory=store.root / name, options=BoxOptions(),
        image_digest=digest, image_config=None, disks=(("bxrootfs", "disk-bxrootfs.qcow2"),),
        auto=auto,
    )  # fmt: skip
    store.reserve(snap)
    store.root.mkdir(exist_ok=True)
    snap.directory.mkdir()
    return snap


def test_a_snapshot_keeps_its_image_in_use(rt):
    _snap(rt, "keep", digest="sha256:" + "cd" * 32)
    assert "sha256:" + "cd" * 32 in rt.images_in_use()


def test_names_are_unique_and_validated(rt):
    _snap(rt, "one")
    with pytest.raises(ConfigError, match="a snapshot named one exists"):
        _snap(rt, "one")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ConfigError):
            BoxOptions(snapshot=bad)
    with pytest.raises(NotFoundError, match="boxlite snapshot ls"):
        rt.snapshot("nope")


@needs_qemu_img
def test_removal_refused_while_a_box_or_a_later_snapshot_stands_on_it(rt, tmp_path: Path):
    snap = _snap(rt, "base")
    frozen = snap.directory / "disk-bxrootfs.qcow2"
    _qcow2(frozen)
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    snapshots.new_overlay(box_dir / "rootfs.qcow2", frozen, 64 * 1024 * 1024)
    with pytest.raises(StateError, match=r"box\(es\) mybox"):
        snapshots.remove(snap, rt.services.snapshots, iter([("mybox", box_dir)]))
    later = _snap(rt, "later")
    snapshots.new_overlay(later.directory / "disk-bxrootfs.qcow2", frozen, 64 * 1024 * 1024)
    with pytest.raises(StateError, match=r"snapshot\(s\) later"):
        snapshots.remove(snap, rt.services.snapshots, iter([]))
    snapshots.remove(later, rt.services.snapshots, iter([]))
    snapshots.remove(snap, rt.services.snapshots, iter([]))
    assert rt.snapshots() == [] and not snap.directory.exists()


@needs_qemu_img
def test_fork_snapshots_go_when_nothing_uses_them(rt, tmp_path: Path):
    taking = _snap(rt, "src-fork-0", auto=True)  # incomplete: maybe being taken right now
    auto = _snap(rt, "src-fork-1", auto=True)
    rt.services.snapshots.mark_complete(auto.name)
    kept = _snap(rt, "mine")
    for snap in (auto, kept):
        _qcow2(snap.directory / "disk-bxrootfs.qcow2")
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    snapshots.new_overlay(box_dir / "rootfs.qcow2", auto.directory / "disk-bxrootfs.qcow2",
                          64 * 1024 * 1024)
    assert snapshots.prune_auto(rt.services.snapshots, [("copy", box_dir)]) == []
    assert snapshots.prune_auto(rt.services.snapshots, []) == ["src-fork-1"]
    # a user's snapshot stays, and so does one whose save has not finished
    assert [s.name for s in rt.snapshots()] == [taking.name, "mine"]


def _qcow2(path: Path) -> None:
    import subprocess

    subprocess.run([find_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "64M"],
                   check=True, timeout=60)
