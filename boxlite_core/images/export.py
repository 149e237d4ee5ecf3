"""`boxlite images export IMAGE DIR`: write an image as an OCI image layout directory.

The layout is the interchange format other tools read (``skopeo copy oci:DIR:TAG …``,
``podman load``) and ``boxlite images import`` reads back. Blobs are copied byte for byte
(the manifest too), so a round trip keeps the manifest digest: the image's identity.

Names: ``org.opencontainers.image.ref.name`` carries the tag, as the OCI spec and skopeo
expect; ``io.containerd.image.name`` carries the full reference, which the importer prefers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageError
from ..models import JsonObject
from .oci import OCI_INDEX, OCI_MANIFEST, canonical_json

if TYPE_CHECKING:
    from .model import Image
    from .store import ImageStore


def _tag_of(reference: str) -> str:
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else ""


def _manifest_bytes(store: ImageStore, image: Image) -> bytes:
    if store.blobs.exists(image.digest):
        return store.blobs.read_bytes(image.digest)
    row = (
        store.db.connection()
        .execute("SELECT manifest_json FROM images WHERE digest = ?", (image.digest,))
        .fetchone()
    )
    raw = row["manifest_json"].encode() if row else b""
    from .blobs import sha256_bytes

    if sha256_bytes(raw) != image.digest:
        raise ImageError(f"manifest {image.digest} is missing from the store; re-import the image")
    return raw


def export_image(store: ImageStore, ref: str, directory: Path | str) -> Path:
    """Write ``ref`` to ``directory`` (created; must be absent or empty) as an OCI layout.

    Written into a sibling temp dir and renamed at the end, so a failure (a damaged blob is
    caught by the store's verifying reader) leaves no half-written layout behind.
    """
    image = store.get(ref)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImageError(f"{target} exists and is not an empty directory; pick a new path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the layout unreadable to others
        blobs_dir = tmp / "blobs" / "sha256"
        blobs_dir.mkdir(parents=True)
        manifest_raw = _manifest_bytes(store, image)
        manifest: JsonObject = json.loads(manifest_raw)
        (blobs_dir / image.digest.split(":", 1)[1]).write_bytes(manifest_raw)
        digests = [image.config_digest, *(layer.digest for layer in image.layers)]
        for digest in dict.fromkeys(digests):
            out = blobs_dir / digest.split(":", 1)[1]
            with store.blobs.open(digest) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        config = store.config_json(image)
        annotations = {}
        if image.reference and "@" not in image.reference:
            annotations["io.containerd.image.name"] = image.reference
            tag = _tag_of(image.reference)
            if tag:
                annotations["org.opencontainers.image.ref.name"] = tag
        entry: JsonObject = {
            "mediaType": manifest.get("mediaType") or OCI_MANIFEST,
            "digest": image.digest,
            "size": len(manifest_raw),
        }
        if annotations:
            entry["annotations"] = annotations
        if config.get("architecture") and config.get("os"):
            entry["platform"] = {"architecture": config["architecture"], "os": config["os"]}
            if config.get("variant"):
                entry["platform"]["variant"] = config["variant"]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        (tmp / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        (tmp / "index.json").write_bytes(canonical_json(index))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
