"""A snapshot's VM runs the guest kit it was saved with: a kit rebuild must keep that kit,
and a restore finds it by id. Real kit cache directories and sealed snapshot manifests; no
kit is built (the files are stand-ins of the right names)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from boxlite_core.kit import builder
from boxlite_core.kit.builder import (
    INITRD_FILE,
    KERNEL_FILE,
    KIT_FILE,
    MANIFEST_FILE,
    ROOT_FILE,
    kit_by_id,
    kit_cache_dir,
    kits_of_snapshots,
)
from boxlite_core.runtime.savedstate import seal


def _kit(home: Path, kit_id: str, age: float) -> Path:
    kit = kit_cache_dir(home) / "kits" / kit_id
    kit.mkdir(parents=True)
    for name in (KERNEL_FILE, INITRD_FILE, ROOT_FILE, MANIFEST_FILE):
        (kit / name).write_bytes(b"stand-in")
    (kit / KIT_FILE).write_text(json.dumps({"kit_id": kit_id, "arch": "x86_64"}))
    then = time.time() - age
    os.utime(kit, (then, then))
    return kit


def _snapshot(home: Path, name: str, kit_id: str) -> None:
    state = home / "snapshots" / name / "vm"
    state.mkdir(parents=True)
    (state / "vmstate").write_bytes(b"saved")
    seal(state, {"snapshot": name, "kit_id": kit_id, "key": "k"})


def test_a_rebuild_keeps_the_kits_snapshots_were_saved_with(tmp_path):
    home = tmp_path / "home"
    for age, kit_id in enumerate(["current", "newer", "older", "snapkit", "oldest"]):
        _kit(home, kit_id, age * 100.0)
    _snapshot(home, "s1", "snapkit")
    assert kits_of_snapshots(home) == {"snapkit"}
    kits = kit_cache_dir(home) / "kits"
    builder._prune(kits, keep={"current", *kits_of_snapshots(home)}, newest=builder.KEEP_KITS)
    left = sorted(p.name for p in kits.iterdir())
    assert "snapkit" in left and "current" in left
    assert "oldest" not in left  # kits no snapshot needs still go
    kit = kit_by_id(home, "snapkit")
    assert kit is not None and kit.kit_id == "snapkit"


def test_kit_by_id_never_leaves_the_kit_cache(tmp_path):
    home = tmp_path / "home"
    _kit(home, "real", 0)
    for bad in ("", "..", "../kits/real", ".hidden", "nosuch"):
        assert kit_by_id(home, bad) is None, bad
