"""zstd layers (``application/vnd.oci.image.layer.v1.tar+zstd``) wherever the media type is
accepted — OCI layout import, docker save import (sniffed), registry pull — and layers that
cannot be decoded, which must fail the import or pull itself (no index row), never a later
box start. Images are built here with tarfile and the zstandard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.layers import apply_layer_stream, apply_layers_merged
from boxlite_testing.oci import (
    ZSTD_MAGIC,
    docker_save_files,
    index_rows,
    oci_layout_files,
    sha,
    write_dir,
    write_tar,
    zstd_compress,
)
from boxlite_testing.zstd_cases import BIG, LOWER, UPPER, ZSTD, check_tree, damaged_layers

DAMAGED = damaged_layers()


def test_oci_layout_with_zstd_layers(store, tmp_path: Path):
    image = store.import_path(write_dir(oci_layout_files([LOWER, UPPER], codec="zstd"),
                                        tmp_path / "layout"))  # fmt: skip
    assert [layer.media_type for layer in image.layers] == [ZSTD, ZSTD]
    assert store.blobs.path(image.layers[0].digest).read_bytes()[:4] == ZSTD_MAGIC
    apply_layers_merged(image, store.blobs, tmp_path / "root")
    check_tree(tmp_path / "root")


def test_zstd_and_gzip_layers_in_one_image(store, tmp_path: Path):
    files = oci_layout_files([LOWER], codec="zstd")
    zstd_blob = next(v for k, v in files.items() if k.startswith("blobs/") and v[:4] == ZSTD_MAGIC)
    mixed = oci_layout_files([LOWER, UPPER], codec="gzip", damaged={0: zstd_blob})
    # damaged= keeps the intact diff IDs: the zstd blob decodes to exactly LOWER
    image = store.import_path(write_dir(mixed, tmp_path / "layout"))
    apply_layers_merged(image, store.blobs, tmp_path / "root")
    check_tree(tmp_path / "root")


@pytest.mark.parametrize(
    ("frames", "skippable"),
    [(4, b""), (1, b"zstd:chunked metadata"), (9, b"toc")],
    ids=["multi-frame", "skippable-first", "both"],
)
def test_every_frame_is_read(store, tmp_path: Path, frames: int, skippable: bytes):
    """zstd:chunked layers are many frames, led by skippable ones: all of them count."""
    blob = zstd_compress(LOWER, frames=frames, skippable=skippable)
    files = oci_layout_files([LOWER, UPPER], codec="zstd", damaged={0: blob})
    image = store.import_path(write_dir(files, tmp_path / "layout"))
    root = tmp_path / "root"
    apply_layers_merged(image, store.blobs, root)
    check_tree(root)


def test_docker_save_zstd_layer_is_sniffed_and_checked(store, tmp_path: Path):
    files = docker_save_files([zstd_compress(LOWER), zstd_compress(UPPER)], tags=["zs:1"])
    image = store.import_path(write_tar(files, tmp_path / "save.tar"))
    assert [layer.media_type for layer in image.layers] == [ZSTD, ZSTD]
    apply_layers_merged(image, store.blobs, tmp_path / "root")
    check_tree(tmp_path / "root")


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay-form layers need root")
def test_zstd_layer_unpacks_for_the_layers_strategy(store, tmp_path: Path):
    image = store.import_path(write_dir(oci_layout_files([LOWER], codec="zstd"),
                                        tmp_path / "layout"))  # fmt: skip
    with store.blobs.open(image.layers[0].digest) as fh:
        apply_layer_stream(fh, tmp_path / "layer", mode="overlay")
    assert (tmp_path / "layer" / "opt" / "big.bin").read_bytes() == BIG


@pytest.mark.parametrize(("label", "blob", "message"), DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_layer_fails_the_import(store, db, tmp_path: Path, label, blob, message):
    files = oci_layout_files([LOWER, UPPER], codec="zstd", damaged={1: blob})
    layer_digest = sha(blob)
    with pytest.raises(ImageError, match=message) as err:
        store.import_path(write_dir(files, tmp_path / "layout"), name="damaged")
    assert layer_digest in str(err.value), "the error must name the layer"
    assert "again" in str(err.value), "the error must say what to do"
    assert index_rows(db) == (0, 0)


@pytest.mark.parametrize(("label", "blob", "message"), DAMAGED[:3], ids=[c[0] for c in DAMAGED[:3]])
def test_damaged_layer_fails_a_docker_save_import(store, db, tmp_path: Path, label, blob, message):
    files = docker_save_files([zstd_compress(LOWER), zstd_compress(UPPER)], tags=["dmg:1"])
    files[json.loads(files["manifest.json"])[0]["Layers"][1]] = blob  # the config keeps UPPER's
    with pytest.raises(ImageError, match=message):
        store.import_path(write_tar(files, tmp_path / "save.tar"))
    assert index_rows(db) == (0, 0)


def test_config_and_manifest_disagree_on_layer_count(store, db, tmp_path: Path):
    files = docker_save_files([zstd_compress(LOWER), zstd_compress(UPPER)], tags=["n:1"])
    cfg_rel = json.loads(files["manifest.json"])[0]["Config"]
    cfg = json.loads(files[cfg_rel])
    cfg["rootfs"]["diff_ids"].append(sha(b"a third layer"))
    files[cfg_rel] = json.dumps(cfg).encode()
    with pytest.raises(ImageError, match=r"config lists 3 layers .*manifest 2"):
        store.import_path(write_tar(files, tmp_path / "save.tar"))
    assert index_rows(db) == (0, 0)


def test_cli_import_of_a_damaged_layer_is_one_error_and_no_box(tmp_path: Path):
    """What a user sees: ``images import`` fails with one error naming the layer and the fix,
    the image is not listed, and running it makes no box (nothing to fail later)."""
    from boxlite_testing.cli import boxlite

    home = tmp_path / "home"
    blob = DAMAGED[0][1]
    layout = write_dir(oci_layout_files([LOWER, UPPER], codec="zstd", damaged={1: blob}),
                       tmp_path / "layout")  # fmt: skip
    proc = boxlite("images", "import", str(layout), "--name", "damaged:1", home=home)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]  # after the progress lines
    assert "cannot be decoded" in error and sha(blob) in error and "again" in error, error
    assert proc.stderr.count("cannot be decoded") == 1
    assert "damaged" not in boxlite("images", "ls", home=home).stdout
    created = boxlite("create", "damaged:1", home=home)
    assert created.returncode != 0
    assert json.loads(boxlite("ls", "-a", "--json", home=home).stdout) == []


def test_export_keeps_zstd_layers_and_reimports_identical(store, tmp_path: Path):
    from boxlite_core.images.export import export_image
    from boxlite_core.images.store import ImageStore
    from boxlite_core.state.db import Database

    image = store.import_path(write_dir(oci_layout_files([LOWER, UPPER], codec="zstd"),
                                        tmp_path / "layout"))  # fmt: skip
    out = export_image(store, image.digest, tmp_path / "exported")
    other_home = tmp_path / "other"
    other = ImageStore(other_home, Database(other_home / "boxlite.db"))
    again = other.import_path(out)
    assert again.digest == image.digest
    assert [x.media_type for x in again.layers] == [ZSTD, ZSTD]
    apply_layers_merged(again, other.blobs, tmp_path / "root")
    check_tree(tmp_path / "root")
