"""Export to an OCI layout (and back), and prune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError, NotFoundError, ToolMissingError
from boxlite_core.images.export import export_image
from boxlite_core.images.prune import prune
from boxlite_core.images.registry import pull
from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database
from boxlite_testing.registry import Pusher, build_image, sha


def _fresh_store(path: Path) -> ImageStore:
    path.mkdir()
    return ImageStore(path, Database(path / "boxlite.db"))


def test_export_layout_and_reimport_identical(registry, pusher, store, insecure, tmp_path):
    img = build_image([{"bin/sh": b"sh"}, {"etc/x": b"x"}], docker=True)
    pusher.image("library/roundtrip", "2.0", img)
    ref = f"{registry.host}/library/roundtrip:2.0"
    pulled = pull(store, ref, settings=insecure)

    out = export_image(store, ref, tmp_path / "layout")

    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((out / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == img.digest and entry["size"] == len(img.manifest)
    assert entry["mediaType"] == img.manifest_type
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "2.0"
    assert entry["annotations"]["io.containerd.image.name"] == ref
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    files = {p.name for p in (out / "blobs" / "sha256").iterdir()}
    assert files == {d.split(":")[1] for d in [img.digest, *img.blobs()]}
    assert (out / "blobs/sha256" / img.digest.split(":")[1]).read_bytes() == img.manifest

    other = _fresh_store(tmp_path / "other")
    again = other.import_path(out, name="roundtrip:2.0")
    assert again.digest == pulled.digest == img.digest
    assert again.config_digest == pulled.config_digest
    assert again.layers == pulled.layers
    with pytest.raises(ImageError, match="not an empty directory"):
        export_image(store, ref, out)


def test_builtin_busybox_export_push_pull(registry, store, insecure, tmp_path):
    """The built-in image, exported, pushed to a registry and pulled into a fresh store."""
    try:
        busybox = store.ensure_builtin("busybox")
    except ToolMissingError as exc:
        pytest.skip(str(exc))
    layout = export_image(store, "busybox", tmp_path / "bb")
    blobs = layout / "blobs" / "sha256"
    pusher = Pusher(registry.url)
    for layer_or_cfg in [busybox.config_digest, *(x.digest for x in busybox.layers)]:
        pusher.blob("library/busybox", (blobs / layer_or_cfg.split(":")[1]).read_bytes())
    entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = (blobs / busybox.digest.split(":")[1]).read_bytes()
    pusher.manifest("library/busybox", "latest", manifest, entry["mediaType"])

    other = _fresh_store(tmp_path / "other")
    pulled = pull(other, f"{registry.host}/library/busybox", settings=insecure)
    assert pulled.digest == busybox.digest
    assert pulled.config.to_dict() == busybox.config.to_dict()


def test_prune_removes_unused_keeps_used(registry, pusher, store, insecure):
    base = {"bin/sh": b"shared base\n" * 50}
    used = build_image([base, {"used": b"u"}])
    unused = build_image([base, {"unused": b"n"}])
    pusher.image("library/prune", "used", used)
    pusher.image("library/prune", "unused", unused)
    a = pull(store, f"{registry.host}/library/prune:used", settings=insecure)
    b = pull(store, f"{registry.host}/library/prune:unused", settings=insecure)
    orphan, _ = store.blobs.put_bytes(b"left behind by a failed pull")

    result = prune(store, in_use={a.digest})

    assert result.removed_images == (b.digest,)
    assert store.get(f"{registry.host}/library/prune:used").digest == a.digest
    with pytest.raises(NotFoundError):
        store.get(f"{registry.host}/library/prune:unused")
    for digest in [a.digest, *used.blobs()]:
        assert store.blobs.exists(digest), digest
    gone = {b.digest, sha(unused.layers[1]), sha(unused.config), orphan}
    assert gone <= set(result.removed_blobs)
    assert not any(store.blobs.exists(d) for d in gone)
    assert result.reclaimed_bytes > 0
    # nothing in use: everything goes
    assert prune(store).removed_images == (a.digest,)
    assert store.blobs.digests() == []
