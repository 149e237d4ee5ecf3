"""Fixtures for the rootfs tests: a strategy context on the shared ``home``/``store``
(boxlite_testing.plugin) and an image with whiteouts to build roots from."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.images.store import ImageStore
from boxlite_core.rootfs.base import RootfsContext


@pytest.fixture
def ctx(home: Path, store: ImageStore) -> RootfsContext:
    return RootfsContext(home=home, image_store=store)


@pytest.fixture
def two_layer_image(store: ImageStore, tmp_path: Path):
    """lower: etc/{keep,gone}, opt/{a,b}, a setuid file owned by 1000; upper deletes
    etc/gone, makes opt opaque with opt/c."""
    from boxlite_testing.oci import d, f, layer_tar, oci_layout_files, write_dir

    lower = layer_tar(
        [d("etc"), f("etc/keep", "k"), f("etc/gone", "g"), d("opt"), f("opt/a", "a"),
         f("opt/b", "b"), d("bin"), f("bin/suid", "s", mode=0o4755, uid=1000, gid=1000)]
    )  # fmt: skip
    upper = layer_tar([f("etc/.wh.gone"), d("opt"), f("opt/.wh..wh..opq"), f("opt/c", "c")])
    files = oci_layout_files([lower, upper], ref="two:1")
    return store.import_path(write_dir(files, tmp_path / "two"))
