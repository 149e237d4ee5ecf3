"""The built-in busybox image, made locally from busybox-static."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from boxlite_core.images.builtin import _is_static_elf
from boxlite_core.images.layers import apply_layers_merged
from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database


def test_busybox_auto_created_with_sh(store, tmp_path: Path):
    assert not store.exists("busybox")
    image = store.get("busybox")
    assert image.reference == "busybox:latest"
    assert image.config.cmd == ("sh",)
    assert image.config.env_dict()["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    root = tmp_path / "root"
    apply_layers_merged(image, store.blobs, root)
    assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
    assert _is_static_elf(root / "bin" / "busybox")
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert "root:x:0:0" in (root / "etc" / "passwd").read_text()
    assert "nobody" in (root / "etc" / "passwd").read_text()
    for name in ("proc", "sys", "dev", "root", "etc/group", "etc/hostname"):
        assert (root / name).exists(), name
    out = subprocess.run(
        [root / "bin" / "busybox", "sh", "-c", "echo hi"], capture_output=True, check=True
    )
    assert out.stdout == b"hi\n"
    assert [i.reference for i in store.list()] == ["busybox:latest"]


def test_busybox_digest_is_deterministic(store, tmp_path: Path):
    other_home = tmp_path / "other"
    other = ImageStore(other_home, Database(other_home / "db"))
    assert store.get("busybox").digest == other.get("busybox").digest


def test_dynamic_binary_is_not_static():
    assert not _is_static_elf(Path("/bin/ls"))
