"""`docker save` / skopeo archives whose layer entries are links to another member.

docker save stores identical layers once and links the other entries to that copy
(``ID/layer.tar -> ../OTHER/layer.tar``); skopeo's docker-archive writes every layer as
``DIGEST.tar`` and links ``ID/layer.tar -> ../DIGEST.tar``. The importer follows such links
lexically inside the archive; it refuses only a link that leaves the archive or loops.
Every archive here is built with tarfile (boxlite_testing.oci.write_tar).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.importers import MAX_LINK_HOPS
from boxlite_core.images.layers import apply_layers_merged
from boxlite_testing.oci import config_for, d, f, index_rows, layer_tar, sha, write_tar

L1 = layer_tar([d("etc"), f("etc/os", "one"), f("etc/base", "base")])
L2 = layer_tar([f("etc/os", "two")])
#: a layer identical to L1 again, on top: what makes docker save link entries
LAYERS = [L1, L2, L1]


def archive(
    tmp_path: Path,
    real: dict[str, bytes],
    layer_paths: list[str],
    *,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> Path:
    """A docker-save tar: ``real`` members (path → layer bytes), a manifest.json listing
    ``layer_paths`` for the layers of :data:`LAYERS`, and the link members."""
    cfg = json.dumps(config_for(LAYERS)).encode()
    files = dict(real)
    files[f"{sha(cfg)[7:]}.json"] = cfg
    files["manifest.json"] = json.dumps(
        [{"Config": f"{sha(cfg)[7:]}.json", "RepoTags": ["links:1"], "Layers": layer_paths}]
    ).encode()
    return write_tar(files, tmp_path / "save.tar", symlinks=symlinks, hardlinks=hardlinks)


def check_imported(store, tmp_path: Path, path: Path) -> None:
    image = store.import_path(path)
    assert [layer.digest for layer in image.layers] == [sha(x) for x in LAYERS]
    root = tmp_path / "root"
    apply_layers_merged(image, store.blobs, root)
    assert (root / "etc" / "os").read_text() == "one"
    assert (root / "etc" / "base").read_text() == "base"


A, B, C = (f"{c * 64}" for c in "abc")


def test_docker_save_link_to_a_sibling_layer(store, tmp_path: Path):
    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1, f"{B}/layer.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks={f"{C}/layer.tar": f"../{A}/layer.tar"},
    )
    check_imported(store, tmp_path, path)


def test_skopeo_links_every_layer_to_a_digest_file(store, tmp_path: Path):
    blobs = {f"{sha(x)[7:]}.tar": x for x in LAYERS}
    ids = [A, B, C]
    links = {f"{i}/layer.tar": f"../{sha(x)[7:]}.tar" for i, x in zip(ids, LAYERS, strict=True)}
    path = archive(tmp_path, blobs, [f"{i}/layer.tar" for i in ids], symlinks=links)
    check_imported(store, tmp_path, path)


def test_chain_of_links(store, tmp_path: Path):
    """C -> B's entry (itself a link) -> the digest file; plus a detour through '..'."""
    path = archive(
        tmp_path,
        {f"{sha(L1)[7:]}.tar": L1, f"{B}/layer.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks={
            f"{A}/layer.tar": f"../{sha(L1)[7:]}.tar",
            f"{C}/layer.tar": f"./../{B}/../{A}/layer.tar",
        },
    )
    check_imported(store, tmp_path, path)


def test_linked_directory_and_hardlink(store, tmp_path: Path):
    """A directory entry that is a symlink (``C -> A``), and a hardlink member."""
    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks={C: A},
        hardlinks={f"{B}/layer.tar": f"{A}/layer.tar"},
    )
    # B is a hardlink to L1's bytes: the config expects L2 there
    with pytest.raises(ImageError, match="config expects"):
        store.import_path(path)
    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1, f"{sha(L2)[7:]}.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks={C: A},
        hardlinks={f"{B}/layer.tar": f"{sha(L2)[7:]}.tar"},
    )
    check_imported(store, tmp_path, path)


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ({f"{C}/layer.tar": "../../outside.tar"}, "leads outside the archive"),
        ({f"{C}/layer.tar": f"../{A}/../../{A}/layer.tar"}, "leads outside the archive"),
        ({f"{C}/layer.tar": "/etc/passwd"}, "absolute path '/etc/passwd'"),
        ({f"{C}/layer.tar": f"../{B}/x.tar", f"{B}/x.tar": f"../{C}/layer.tar"}, "link loop"),
        ({f"{C}/layer.tar": "./layer.tar"}, "link loop"),
        ({f"{C}/layer.tar": "../nowhere/layer.tar"}, "missing from the archive"),
    ],
    ids=["climbs-out", "climbs-out-midway", "absolute", "loop", "self-loop", "dangling"],
)
def test_links_that_leave_the_archive_or_loop_are_refused(
    store, db, tmp_path: Path, links: dict[str, str], message: str
):
    outside = tmp_path / "outside.tar"
    outside.write_bytes(L1)  # what a climbing link would reach if it were followed
    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1, f"{B}/layer.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks=links,
    )
    with pytest.raises(ImageError, match=message) as err:
        store.import_path(path)
    assert "save.tar" in str(err.value), "the error must name the archive"
    assert index_rows(db) == (0, 0)


@pytest.mark.parametrize("hops", [MAX_LINK_HOPS, MAX_LINK_HOPS + 1])
def test_long_chain_is_followed_up_to_the_limit(store, tmp_path: Path, hops: int):
    """links/0 -> links/1 -> ... -> the real layer: at most MAX_LINK_HOPS links."""
    chain = {f"links/{i}": f"{i + 1}" for i in range(hops - 1)}
    chain[f"links/{hops - 1}"] = f"../{A}/layer.tar"
    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1, f"{B}/layer.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", "links/0"],
        symlinks=chain,
    )
    if hops <= MAX_LINK_HOPS:
        check_imported(store, tmp_path, path)
    else:
        with pytest.raises(ImageError, match="link loop"):
            store.import_path(path)


def test_extracted_archive_directory_follows_the_same_links(store, db, tmp_path: Path):
    """The same archive unpacked into a directory: the file system follows the links, and
    one that climbs out of the directory is still refused."""
    import tarfile

    path = archive(
        tmp_path,
        {f"{A}/layer.tar": L1, f"{B}/layer.tar": L2},
        [f"{A}/layer.tar", f"{B}/layer.tar", f"{C}/layer.tar"],
        symlinks={f"{C}/layer.tar": f"../{A}/layer.tar"},
    )
    extracted = tmp_path / "extracted"
    with tarfile.open(path) as tar:
        tar.extractall(extracted, filter="tar")
    check_imported(store, tmp_path, extracted)
    (extracted / C / "layer.tar").unlink()
    (extracted / C / "layer.tar").symlink_to("../../outside.tar")
    (tmp_path / "outside.tar").write_bytes(L1)
    store.remove("links:1")
    with pytest.raises(ImageError, match="outside the image directory"):
        store.import_path(extracted)
    assert index_rows(db) == (0, 0)
