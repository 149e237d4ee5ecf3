"""`boxlite images prune`: drop every image no box uses, then every blob no image needs.

Which images boxes use is the runtime's knowledge (box records hold image digests), so the
caller passes ``in_use``; this module only knows the store. Images go through the store's own
``remove`` (it also drops their rootfs caches); a final sweep deletes blobs that no image row
mentions: leftovers of failed pulls and imports, and stale temp files.

A pull writes blobs before its index row exists, so a concurrent prune would see them as
orphans. ``gc_guard`` closes that window: pulls hold it shared, prune exclusive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .store import ImageStore

#: temp files younger than this may belong to an import running right now
TMP_GRACE_SECONDS = 3600


@contextlib.contextmanager
def gc_guard(store: ImageStore, *, shared: bool) -> Iterator[None]:
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / ".prune.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@attrs.frozen
class PruneResult:
    removed_images: tuple[str, ...]
    removed_blobs: tuple[str, ...]
    reclaimed_bytes: int


def referenced_digests(store: ImageStore) -> set[str]:
    """Manifest, config and layer digests of every indexed image."""
    keep: set[str] = set()
    for row in store.db.connection().execute(
        "SELECT digest, config_digest, manifest_json FROM images"
    ):
        keep.add(row["digest"])
        keep.add(row["config_digest"])
        layers = json.loads(row["manifest_json"]).get("layers", ())
        keep.update(d["digest"] for d in layers if isinstance(d, dict) and "digest" in d)
    return keep


def prune(store: ImageStore, in_use: set[str] | frozenset[str] = frozenset()) -> PruneResult:
    """Remove images whose digest is not in ``in_use``, then unreferenced blobs."""
    removed_images: list[str] = []
    removed_blobs: list[str] = []
    reclaimed = 0
    with gc_guard(store, shared=False):
        before = {d: _size(store, d) for d in store.blobs.digests()}
        digests = [
            r["digest"] for r in store.db.connection().execute("SELECT digest FROM images")
        ]
        for digest in digests:
            if digest in in_use:
                continue
            store.remove(digest, in_use=in_use, force=True)
            removed_images.append(digest)
        keep = referenced_digests(store)
        for digest in store.blobs.digests():
            if digest not in keep:
                store.blobs.delete(digest)
        after = set(store.blobs.digests())
        for digest, size in before.items():
            if digest not in after:
                removed_blobs.append(digest)
                reclaimed += size
        now = time.time()
        if store.blobs.tmp.is_dir():
            for tmp in store.blobs.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if now - tmp.stat().st_mtime > TMP_GRACE_SECONDS:
                        reclaimed += tmp.stat().st_size
                        tmp.unlink()
    return PruneResult(tuple(removed_images), tuple(sorted(removed_blobs)), reclaimed)


def _size(store: ImageStore, digest: str) -> int:
    try:
        return store.blobs.size(digest)
    except OSError:
        return 0
