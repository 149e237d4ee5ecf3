"""The local image index: which images exist, under which references.

Rows live in the runtime's sqlite (tables ``images`` and ``image_refs``); bytes live in the
content-addressed blob store. An import writes blobs first and the rows last, in one
transaction, so an image is either fully in the index or not at all.

The top of ``images/`` (see the package docstring for the dependency direction): the store
runs an importer or a built-in builder — which write blobs or a layout and know nothing of
the index — and records what they return. Nothing below it imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError, ImageError, NotFoundError, StateError
from ..models import JsonObject
from ..state.db import Database
from .blobs import BlobStore
from .builtin import BUILTIN_IMAGES
from .importers import Imported, import_any
from .model import Image, ImageConfig, Layer
from .oci import chain_keys
from .reference import check_local_reference, normalize_reference

ProgressFn = Callable[[str, float | None], None]
_HEX_RE = re.compile(r"^[0-9a-f]{4,64}$")
_NOT_FOUND_HINT = "run `boxlite images import PATH` or see `boxlite images ls`"


def _image_from_row(row: sqlite3.Row, reference: str) -> Image:
    manifest = json.loads(row["manifest_json"])
    config = json.loads(row["config_json"])
    layers = tuple(
        Layer(digest=d["digest"], media_type=d.get("mediaType", ""), size=int(d.get("size", 0)))
        for d in manifest.get("layers", ())
    )
    return Image(
        reference=reference,
        digest=row["digest"],
        layers=layers,
        config=ImageConfig.from_oci(config),
        config_digest=row["config_digest"],
        size=int(row["size"]),
        created=float(row["created_at"]),
    )


class ImageStore:
    """Images of one runtime home. Several processes may use it at once."""

    def __init__(self, home: Path, db: Database) -> None:
        self.home = Path(home)
        self.db = db
        self.root = self.home / "images"
        self.blobs = BlobStore(self.root / "blobs")

    # -- import ----------------------------------------------------------------------------
    def import_path(
        self, path: Path | str, name: str | None = None, progress: ProgressFn | None = None
    ) -> Image:
        """Import an OCI layout dir, OCI archive or `docker save` tar; return the image.

        ``name`` tags it (else the archive's own tag, else it is reachable by digest only).
        On any failure no index row is written.
        """
        reference = check_local_reference(name) if name else None
        # the gc lock: a concurrent remove must not collect a blob this import reuses
        with self.lock("gc"):
            imported = import_any(Path(path), self.blobs, want=reference, progress=progress)
            if reference is None and imported.names:
                with contextlib.suppress(ConfigError):
                    reference = check_local_reference(imported.names[0])
            image = self._record(imported, reference)
        if progress:
            progress(f"imported {reference or image.digest}", 1.0)
        return image

    def add_imported(self, imported: Imported, reference: str | None) -> Image:
        """Index an image whose blobs are all in the store already (registry pulls).

        ``reference`` is checked by the caller: registry names (``host:port/name:tag``) are
        wider than the local NAME[:TAG] that `import_path` accepts.
        """
        # gc lock: a concurrent `images rm` must not collect blobs this image reuses
        with self.lock("gc"):
            return self._record(imported, normalize_reference(reference) if reference else None)

    def _record(self, imported: Imported, reference: str | None) -> Image:
        size = len(imported.manifest_bytes) + len(imported.config_bytes)
        size += sum(int(layer.get("size", 0)) for layer in imported.manifest["layers"])
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO images(digest, config_digest, manifest_json, config_json,"
                " size, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    imported.manifest_digest,
                    imported.config_digest,
                    imported.manifest_bytes.decode(),
                    imported.config_bytes.decode(),
                    size,
                    time.time(),
                ),
            )
            if reference:
                tx.execute(
                    "INSERT INTO image_refs(reference, digest) VALUES (?, ?) "
                    "ON CONFLICT(reference) DO UPDATE SET digest = excluded.digest",
                    (reference, imported.manifest_digest),
                )
            row = tx.execute(
                "SELECT * FROM images WHERE digest = ?", (imported.manifest_digest,)
            ).fetchone()
        return _image_from_row(row, reference or "")

    # -- lookup ----------------------------------------------------------------------------
    def _lookup(self, ref: str) -> Image | None:
        conn = self.db.connection()
        text = ref.strip()
        norm = normalize_reference(text)
        row = conn.execute(
            "SELECT i.* FROM image_refs r JOIN images i ON i.digest = r.digest "
            "WHERE r.reference = ?",
            (norm,),
        ).fetchone()
        if row is not None:
            return _image_from_row(row, norm)
        if "@" in text:
            text = text.split("@", 1)[1]
        hexpart = text[7:] if text.startswith("sha256:") else text
        if not _HEX_RE.match(hexpart):
            return None
        rows = conn.execute(
            "SELECT * FROM images WHERE digest LIKE ?", ("sha256:" + hexpart + "%",)
        ).fetchall()
        if len(rows) > 1:
            raise ConfigError(f"image id {ref!r} is ambiguous; give more digits")
        if not rows:
            return None
        refs = self._refs_of(rows[0]["digest"])
        return _image_from_row(rows[0], refs[0] if refs else "")

    def _refs_of(self, digest: str) -> list[str]:
        rows = self.db.connection().execute(
            "SELECT reference FROM image_refs WHERE digest = ? ORDER BY reference", (digest,)
        )
        return [r["reference"] for r in rows]

    def get(self, ref_or_digest: str) -> Image:
        """Find an image by reference ('busybox' means 'busybox:latest'), digest or short id.

        The built-in images are created on first use, locally and without network.
        """
        image = self._lookup(ref_or_digest)
        if image is not None:
            return image
        if normalize_reference(ref_or_digest) in BUILTIN_IMAGES:
            return self.ensure_builtin(ref_or_digest)
        raise NotFoundError(f"image {ref_or_digest!r} is not in the local store; {_NOT_FOUND_HINT}")

    def exists(self, ref_or_digest: str) -> bool:
        return self._lookup(ref_or_digest) is not None

    def list(self) -> list[Image]:
        """One entry per reference, plus untagged images (reference '')."""
        conn = self.db.connection()
        out = []
        for row in conn.execute("SELECT * FROM images ORDER BY created_at, digest"):
            refs = self._refs_of(row["digest"]) or [""]
            out.extend(_image_from_row(row, ref) for ref in refs)
        return out

    def config_json(self, image: Image) -> JsonObject:
        row = (
            self.db.connection()
            .execute("SELECT config_json FROM images WHERE digest = ?", (image.digest,))
            .fetchone()
        )
        return json.loads(row["config_json"]) if row else {}

    def layer_blob(self, layer: Layer) -> Path:
        path = self.blobs.path(layer.digest)
        if not path.is_file():
            raise ImageError(f"layer blob {layer.digest} is missing; re-import the image")
        return path

    # -- built-ins ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A cross-process lock under the images dir (built-in creation, removal)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ensure_builtin(self, name: str = "busybox") -> Image:
        """The built-in image ``name``, built and imported on first use (under a lock).

        Raises:
            NotFoundError: ``name`` is not a built-in image.
            ToolMissingError: the host lacks what the builder needs (e.g. busybox-static).
        """
        ref = normalize_reference(name)
        builder = BUILTIN_IMAGES.get(ref)
        if builder is None:
            raise NotFoundError(
                f"{name!r} is not a built-in image (built-ins: {', '.join(BUILTIN_IMAGES)})"
            )
        with self.lock("builtin"):
            image = self._lookup(ref)
            if image is not None:
                return image
            tmp_parent = self.root / "tmp"
            tmp_parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tmp_parent, prefix="builtin-") as tmp:
                return self.import_path(builder(Path(tmp)), name=ref)

    # -- removal --------------------------------------------------------------------------
    def remove(
        self, ref: str, in_use: set[str] | frozenset[str] = frozenset(), force: bool = False
    ) -> list[str]:
        """Untag ``ref``; delete the image once no reference is left. Returns what happened.

        ``in_use`` holds the digests of images that boxes (in any state) use: their disk
        overlays and layer shares point into this image's caches, so those are refused.
        ``force`` removes every reference of the image at once (still not an in-use one).
        """
        with self.lock("gc"):
            image = self._lookup(ref)
            if image is None:
                raise NotFoundError(f"image {ref!r} is not in the local store; {_NOT_FOUND_HINT}")
            refs = self._refs_of(image.digest)
            norm = normalize_reference(ref)
            by_ref = norm in refs
            done: list[str] = []
            if by_ref and len(refs) > 1 and not force:
                with self.db.transaction() as tx:
                    tx.execute("DELETE FROM image_refs WHERE reference = ?", (norm,))
                return [f"untagged: {norm}"]
            if image.digest in in_use:
                raise StateError(
                    f"image {ref} ({image.short_id}) is used by a box; remove the box first"
                )
            if not by_ref and len(refs) > 1 and not force:
                raise StateError(
                    f"image {image.short_id} has references {', '.join(refs)}; "
                    "remove them by name or pass force"
                )
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM image_refs WHERE digest = ?", (image.digest,))
                tx.execute("DELETE FROM images WHERE digest = ?", (image.digest,))
            done += [f"untagged: {r}" for r in refs]
            done.append(f"deleted: {image.digest}")
            self._gc(image)
            return done

    def _gc(self, removed: Image) -> None:
        """Delete blobs and rootfs caches that no remaining image needs."""
        keep: set[str] = set()
        keep_chains: set[str] = set()
        for row in self.db.connection().execute(
            "SELECT digest, config_digest, manifest_json FROM images"
        ):
            keep.add(row["digest"])
            keep.add(row["config_digest"])
            layers = [d["digest"] for d in json.loads(row["manifest_json"]).get("layers", ())]
            keep.update(layers)
            keep_chains.update(chain_keys(layers))
        candidates = {removed.digest, removed.config_digest, *(x.digest for x in removed.layers)}
        cache = self.home / "cache" / "rootfs"
        for digest in candidates - keep:
            self.blobs.delete(digest)
            # layer directories of the format before chains (trusted.overlay.* marks)
            shutil.rmtree(cache / "layers" / digest.split(":", 1)[1], ignore_errors=True)
        for chain in set(chain_keys([x.digest for x in removed.layers])) - keep_chains:
            shutil.rmtree(cache / "layer-chains" / chain.split(":", 1)[1], ignore_errors=True)
        if removed.digest not in keep:
            hexpart = removed.digest.split(":", 1)[1]
            with contextlib.suppress(FileNotFoundError):
                (cache / "disk" / f"{hexpart}.ext4").unlink()
