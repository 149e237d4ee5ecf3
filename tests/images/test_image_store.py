"""The image index: references, lookups, listing, removal, corruption on read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError, NotFoundError, StateError
from boxlite_core.images.blobs import BlobStore
from boxlite_core.images.layers import apply_layers_merged
from boxlite_core.images.reference import normalize_reference
from boxlite_testing.oci import d, f, index_rows, layer_tar, oci_layout_files, write_dir


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("busybox", "busybox:latest"),
        ("busybox:1.36", "busybox:1.36"),
        ("docker.io/library/busybox", "busybox:latest"),
        ("registry:5000/team/app", "registry:5000/team/app:latest"),
        ("sha256:abc", "sha256:abc"),
    ],
)
def test_normalize_reference(given: str, want: str):
    assert normalize_reference(given) == want


def _import(store, tmp_path: Path, ref: str, content: str, gzip_layers: bool = True):
    layer = layer_tar([d("etc"), f("etc/id", content)])
    files = oci_layout_files([layer], ref=ref, gzip_layers=gzip_layers)
    return store.import_path(write_dir(files, tmp_path / ref.replace(":", "_")))


def test_get_by_ref_digest_and_short_id(store, tmp_path: Path):
    image = _import(store, tmp_path, "app:latest", "a")
    assert store.get("app").digest == image.digest
    assert store.get(image.digest).reference == "app:latest"
    assert store.get(image.short_id).digest == image.digest
    assert store.get(f"app@{image.digest}").digest == image.digest


def test_get_missing_names_the_fix(store):
    with pytest.raises(NotFoundError, match=r"boxlite images import.*boxlite images ls"):
        store.get("nothere:1")


def test_list_has_one_row_per_reference(store, tmp_path: Path):
    a = _import(store, tmp_path, "a:1", "a")
    _import(store, tmp_path, "b:1", "b")
    store.import_path(tmp_path / "a_1", name="alias:1")
    refs = sorted(i.reference for i in store.list())
    assert refs == ["a:1", "alias:1", "b:1"]
    assert {i.digest for i in store.list() if i.reference in ("a:1", "alias:1")} == {a.digest}


def test_remove_untags_then_deletes_and_collects_blobs(store, db, home: Path, tmp_path: Path):
    a = _import(store, tmp_path, "a:1", "a")
    store.import_path(tmp_path / "a_1", name="alias:1")
    cache = home / "cache" / "rootfs" / "disk"
    cache.mkdir(parents=True)
    (cache / f"{a.digest[7:]}.ext4").write_bytes(b"base")
    assert store.remove("alias:1") == ["untagged: alias:1"]
    assert store.exists("a:1") and not store.exists("alias:1")
    out = store.remove("a:1")
    assert out[-1] == f"deleted: {a.digest}"
    assert index_rows(db) == (0, 0)
    assert not store.blobs.exists(a.layers[0].digest)
    assert not store.blobs.exists(a.digest)
    assert not (cache / f"{a.digest[7:]}.ext4").exists()


def test_remove_refuses_in_use(store, db, tmp_path: Path):
    a = _import(store, tmp_path, "a:1", "a")
    with pytest.raises(StateError, match="used by a box"):
        store.remove("a:1", in_use={a.digest})
    with pytest.raises(StateError, match="used by a box"):
        store.remove("a:1", in_use={a.digest}, force=True)
    assert index_rows(db) == (1, 1)
    with pytest.raises(NotFoundError):
        store.remove("zzz")


def test_shared_layer_survives_removal_of_one_image(store, tmp_path: Path):
    shared = layer_tar([d("base"), f("base/f", "shared")])
    own = layer_tar([f("own", "x")])
    one = store.import_path(write_dir(oci_layout_files([shared, own], ref="one:1"), tmp_path / "1"))
    two = store.import_path(write_dir(oci_layout_files([shared], ref="two:1"), tmp_path / "2"))
    assert one.layers[0].digest == two.layers[0].digest
    store.remove("one:1")
    assert store.blobs.exists(two.layers[0].digest)
    assert not store.blobs.exists(one.layers[1].digest)


def test_corrupted_blob_detected_on_read(store, tmp_path: Path):
    image = _import(store, tmp_path, "c:1", "original", gzip_layers=False)
    blob = store.layer_blob(image.layers[0])
    os.chmod(blob, 0o644)
    # flip file content (tar checksums only headers): only the sha256 can notice
    blob.write_bytes(blob.read_bytes().replace(b"original", b"0riginal"))
    with pytest.raises(ImageError, match=r"is corrupt \(expected sha256:.*got sha256:.*re-import"):
        apply_layers_merged(image, store.blobs, tmp_path / "root")


def test_blob_store_put_verify_and_open(tmp_path: Path):
    blobs = BlobStore(tmp_path / "blobs")
    digest, size = blobs.put_bytes(b"hello")
    assert size == 5 and blobs.exists(digest)
    assert blobs.read_bytes(digest) == b"hello"
    with pytest.raises(ImageError, match="does not match"):
        blobs.put_bytes(b"other", expected_digest="sha256:" + "0" * 64)
    assert not list((tmp_path / "blobs" / "tmp").iterdir()), "temp files left behind"
    path = blobs.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"HELLO")
    with pytest.raises(ImageError, match="corrupt"), blobs.open(digest) as fh:
        fh.read(2)  # consumer stops early: the check still runs on close
    assert blobs.delete(digest) and not blobs.exists(digest)
    with pytest.raises(ImageError, match="malformed digest"):
        blobs.path("sha256:../../etc")
