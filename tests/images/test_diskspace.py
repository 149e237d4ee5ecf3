"""Long writes into the home check free space first and stop before the disk is full.

Real parts: a real 20 MiB tmpfs as the home (or its cache), real image import, a real blob
stream of unknown size, the real ext4 base build. The reserve is set to 1 MiB so that a 20 MiB
filesystem is usable at all.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from boxlite_core.diskspace import DiskSpaceError
from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database
from boxlite_testing.oci import f, layer_tar, oci_layout_files, write_dir, write_tar
from boxlite_testing.tmpfs import small_tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
MIB = 1024 * 1024




@pytest.fixture(autouse=True)
def _small_reserve(monkeypatch):
    monkeypatch.setenv("BOXLITE_DISK_RESERVE_MIB", "1")


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _random_image(tmp_path: Path, mib: int) -> Path:
    """An image tar with one layer of incompressible data (gzip cannot shrink it)."""
    layer = layer_tar([f("blob.bin", os.urandom(mib * MIB))])
    return write_tar(oci_layout_files([layer], gzip_layers=False), tmp_path / "image.tar")


def _leftovers(home: Path) -> list[str]:
    out = []
    for sub in ("images/blobs", "images/tmp", "cache"):
        root = home / sub
        if root.exists():
            out += [str(p.relative_to(home)) for p in root.rglob("*") if p.is_file()]
    return out


@pytest.mark.timeout(120)
def test_importing_an_image_bigger_than_the_home_fails_before_writing(tmp_path):
    image = _random_image(tmp_path, 30)
    with small_tmpfs(tmp_path / "home") as home:
        store = ImageStore(home, Database(home / "boxlite.db"))
        before = _free(home)
        with pytest.raises(DiskSpaceError) as err:
            store.import_path(image, name="big:1")
        msg = str(err.value)
        assert "not enough disk space" in msg and str(home) in msg, msg
        assert "needs 30 MiB" in msg or "needs 31 MiB" in msg, msg
        assert "free" in msg and "BOXLITE_HOME" in msg, msg
        assert _leftovers(home) == []
        assert _free(home) >= before - MIB, "the import wrote data before refusing"


@pytest.mark.timeout(120)
def test_a_stream_of_unknown_size_stops_before_the_disk_is_full(tmp_path):
    """A source that never ends (a registry or a docker-save member that lies) is cut off."""

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = b"\0" * len(buffer)
            return len(buffer)

    with small_tmpfs(tmp_path / "home") as home:
        store = ImageStore(home, Database(home / "boxlite.db"))
        with pytest.raises(DiskSpaceError, match="not enough disk space"):
            store.blobs.put_stream(io.BufferedReader(Endless()))
        assert _leftovers(home) == []
        assert _free(home) > 0, "the disk filled up before the guard stopped"


@pytest.mark.timeout(300)
def test_ext4_base_bigger_than_the_cache_fails_clearly_and_leaves_nothing(tmp_path):
    from boxlite_core.rootfs.base import RootfsContext
    from boxlite_core.rootfs.disk import base_cache_dir, ensure_base

    home = tmp_path / "home"
    home.mkdir()
    store = ImageStore(home, Database(home / "boxlite.db"))
    layer = layer_tar([f("blob.bin", os.urandom(12 * MIB))])
    layout = write_dir(oci_layout_files([layer], gzip_layers=False), tmp_path / "layout")
    image = store.import_path(layout, name="mid:1")
    with small_tmpfs(home / "cache") as cache:
        with pytest.raises(DiskSpaceError) as err:
            ensure_base(image, RootfsContext(home=home, image_store=store))
        msg = str(err.value)
        assert "ext4 base of image sha256:" in msg and str(cache) in msg, msg
        assert not list(base_cache_dir(home).glob("*.ext4"))
        assert not list(base_cache_dir(home).glob("build-*")), "half-built base left behind"


@pytest.mark.timeout(300)
def test_a_small_gzip_layer_that_unpacks_bigger_than_the_disk_stops_in_time(tmp_path):
    """A hostile image: 64 MiB of zeros gzip to ~64 KiB; import is fine, unpacking is not."""
    from boxlite_core.rootfs.base import RootfsContext
    from boxlite_core.rootfs.disk import base_cache_dir, ensure_base

    home = tmp_path / "home"
    home.mkdir()
    store = ImageStore(home, Database(home / "boxlite.db"))
    layer = layer_tar([f("zeros.bin", bytes(64 * MIB))])
    layout = write_dir(oci_layout_files([layer], gzip_layers=True), tmp_path / "layout")
    image = store.import_path(layout, name="bomb:1")
    assert sum(x.size for x in image.layers) < MIB
    with small_tmpfs(home / "cache") as cache:
        with pytest.raises(DiskSpaceError) as err:
            ensure_base(image, RootfsContext(home=home, image_store=store))
        msg = str(err.value)
        assert "unpacking layer" in msg and "needs 64 MiB" in msg, msg
        assert not list(base_cache_dir(home).glob("build-*")), "half-unpacked tree left behind"
        assert _free(cache) > 8 * MIB, "the unpack filled the filesystem before stopping"
