"""Importing the three archive formats, and failures that must leave the index untouched."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.layers import apply_layers_merged
from boxlite_testing.oci import (
    d,
    docker_save_files,
    f,
    index_rows,
    layer_tar,
    oci_layout_files,
    sha,
    sym,
    write_dir,
    write_tar,
)

L1 = layer_tar(
    [d("bin"), f("bin/hello", "#!/bin/sh\necho hi\n", mode=0o755), d("etc"), f("etc/os", "one")]
)
L2 = layer_tar([f("etc/os", "two"), sym("bin/hi", "hello"), f("etc/.wh.gone")])


def unpacked(store, image, tmp_path: Path) -> Path:
    root = tmp_path / "unpacked"
    apply_layers_merged(image, store.blobs, root)
    return root


def check_image(store, image, tmp_path: Path) -> None:
    assert len(image.layers) == 2
    assert image.config.cmd == ("sh",)
    root = unpacked(store, image, tmp_path)
    assert (root / "etc" / "os").read_text() == "two"
    assert (root / "bin" / "hi").readlink() == Path("hello")
    assert (root / "bin" / "hello").stat().st_mode & 0o777 == 0o755


def test_oci_layout_dir(store, tmp_path: Path):
    files = oci_layout_files([L1, L2], ref="test:1")
    image = store.import_path(write_dir(files, tmp_path / "layout"))
    assert image.reference == "test:1"
    assert image.digest == files["_manifest_digest"].decode()
    assert image.layers[0].media_type.endswith("+gzip")
    check_image(store, image, tmp_path)
    assert store.get("test:1").digest == image.digest


def test_oci_archive_tar(store, tmp_path: Path):
    files = oci_layout_files([L1, L2], ref=None, gzip_layers=False)
    image = store.import_path(write_tar(files, tmp_path / "img.tar"), name="mine")
    assert image.reference == "mine:latest"
    check_image(store, image, tmp_path)


def test_oci_index_picks_host_arch_manifest(store, tmp_path: Path):
    files = oci_layout_files([L1, L2], extra_platforms=("arm64", "s390x"))
    image = store.import_path(write_dir(files, tmp_path / "layout"))
    assert image.digest == files["_manifest_digest"].decode()


def test_oci_index_without_host_arch_is_clear_error(store, db, tmp_path: Path):
    files = oci_layout_files([L1])
    index = json.loads(files["index.json"])
    index["manifests"][0]["platform"]["architecture"] = "riscv64"
    files["index.json"] = json.dumps(index).encode()
    with pytest.raises(ImageError, match=r"no manifest for linux/amd64.*riscv64"):
        store.import_path(write_dir(files, tmp_path / "layout"))
    assert index_rows(db) == (0, 0)


@pytest.mark.parametrize("blobs_style", [False, True])
def test_docker_save_tar(store, db, tmp_path: Path, blobs_style: bool):
    files = docker_save_files([L1, L2], tags=["library/app:2"], blobs_style=blobs_style)
    image = store.import_path(write_tar(files, tmp_path / "save.tar"))
    assert image.reference == "library/app:2"
    assert [x.media_type for x in image.layers] == ["application/vnd.oci.image.layer.v1.tar"] * 2
    assert image.layers[0].digest == sha(L1)
    # downstream sees an OCI manifest, stored as a blob under the image digest
    manifest = json.loads(store.blobs.read_bytes(image.digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    check_image(store, image, tmp_path)
    assert index_rows(db) == (1, 1)


def test_docker_save_gzip_layer_sniffed(store, tmp_path: Path):
    files = docker_save_files([gzip.compress(L1)], tags=["gz:1"])
    cfg_rel = json.loads(files["manifest.json"])[0]["Config"]
    cfg = json.loads(files[cfg_rel])
    cfg["rootfs"]["diff_ids"] = [sha(L1)]
    files[cfg_rel] = json.dumps(cfg).encode()
    image = store.import_path(write_tar(files, tmp_path / "s.tar"))
    assert image.layers[0].media_type.endswith("+gzip")
    assert (unpacked(store, image, tmp_path) / "etc" / "os").read_text() == "one"


def test_reimport_is_idempotent_and_retags(store, db, tmp_path: Path):
    files = oci_layout_files([L1])
    path = write_dir(files, tmp_path / "layout")
    a = store.import_path(path)
    b = store.import_path(path, name="other")
    assert a.digest == b.digest
    assert index_rows(db) == (1, 2)


# -- failures: nothing in the index -------------------------------------------------------
def _broken_cases(tmp_path: Path):
    ok = oci_layout_files([L1, L2])
    mdig = ok["_manifest_digest"].decode()
    manifest = json.loads(ok[f"blobs/sha256/{mdig[7:]}"])
    layer_rel = f"blobs/sha256/{manifest['layers'][1]['digest'][7:]}"

    missing_layer = dict(ok)
    del missing_layer[layer_rel]
    yield "missing layer blob", missing_layer, "is missing"

    corrupt_layer = dict(ok)
    corrupt_layer[layer_rel] = b"tampered"
    yield "tampered layer", corrupt_layer, "does not match"

    bad_json = dict(ok)
    bad_json["index.json"] = b"{nope"
    yield "bad index json", bad_json, "not valid JSON"

    no_index = dict(ok)
    del no_index["index.json"]
    yield "no index", no_index, "neither an OCI image layout"

    bad_digest = dict(ok)
    idx = json.loads(ok["index.json"])
    idx["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    bad_digest["index.json"] = json.dumps(idx).encode()
    yield "path in digest", bad_digest, "malformed digest"

    bad_media = dict(ok)
    m2 = dict(manifest)
    m2["layers"] = [{**manifest["layers"][0], "mediaType": "application/x-evil"}]
    raw = json.dumps(m2).encode()
    bad_media[f"blobs/sha256/{sha(raw)[7:]}"] = raw
    idx = json.loads(ok["index.json"])
    idx["manifests"][0].update(digest=sha(raw), size=len(raw))
    bad_media["index.json"] = json.dumps(idx).encode()
    yield "unknown media type", bad_media, "unsupported media type"

    ds = docker_save_files([L1, L2], tags=["x:1"])
    ds_missing = {k: v for k, v in ds.items() if not k.startswith("00000000")}
    yield "docker save missing layer", ds_missing, "missing from the archive"

    ds_wrong = dict(ds)
    ds_wrong[json.loads(ds["manifest.json"])[0]["Layers"][1]] = L1
    yield "docker save diff_id mismatch", ds_wrong, "config expects"


@pytest.mark.parametrize("as_tar", [False, True])
def test_malformed_archives_leave_no_index_entry(store, db, tmp_path: Path, as_tar: bool):
    for i, (label, files, message) in enumerate(_broken_cases(tmp_path)):
        dest = tmp_path / f"case{i}{'.tar' if as_tar else ''}"
        path = write_tar(files, dest) if as_tar else write_dir(files, dest)
        with pytest.raises(ImageError, match=message):
            store.import_path(path, name="broken")
        assert index_rows(db) == (0, 0), label


def test_not_an_archive(store, db, tmp_path: Path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello world" * 100)
    with pytest.raises(ImageError, match="not a readable tar"):
        store.import_path(junk)
    with pytest.raises(ImageError, match="does not exist"):
        store.import_path(tmp_path / "nope")
    assert index_rows(db) == (0, 0)
