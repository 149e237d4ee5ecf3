"""Pulling zstd layers (``application/vnd.oci.image.layer.v1.tar+zstd``) from a real registry,
and layers that cannot be decoded: the pull fails and writes no index row."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.layers import apply_layers_merged
from boxlite_core.images.registry import pull
from boxlite_testing.registry import build_image, index_rows, sha
from boxlite_testing.zstd_cases import LOWER, UPPER, ZSTD, check_tree, damaged_layers

DAMAGED = damaged_layers()


def test_pull_zstd_image(registry, pusher, store, insecure, tmp_path: Path):
    img = build_image([], tars=[LOWER, UPPER], codec="zstd")
    pusher.image("library/zstd", "v1", img)
    image = pull(store, f"{registry.host}/library/zstd:v1", settings=insecure)
    assert [layer.media_type for layer in image.layers] == [ZSTD, ZSTD]
    apply_layers_merged(image, store.blobs, tmp_path / "root")
    check_tree(tmp_path / "root")


@pytest.mark.parametrize(("label", "blob", "message"), DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_layer_fails_the_pull(registry, pusher, store, insecure, label, blob, message):
    img = build_image([], tars=[LOWER, UPPER], codec="zstd", damaged={1: blob})
    repo = f"library/damaged-{label}"
    pusher.image(repo, "v1", img)
    with pytest.raises(ImageError, match=message) as err:
        pull(store, f"{registry.host}/{repo}:v1", settings=insecure)
    assert sha(blob) in str(err.value)
    assert index_rows(store) == []
