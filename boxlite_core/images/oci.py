"""Facts from the OCI image spec (and docker's v2 formats) that every image module shares.

A leaf: it imports nothing from ``images/``, so the modules that read images (importers, the
registry pull), write them (builtin, export) or unpack them (layers) can all name the same
media types without importing each other (the package docstring draws the whole direction).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence

from ..models import JsonValue

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
#: annotations that carry an image's name in an index (containerd's, then the spec's own)
REF_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
#: the layer media types the unpacker reads (tar, gzip, zstd; OCI and docker spellings)
LAYER_MEDIA_TYPES = frozenset(
    {
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)


def canonical_json(obj: JsonValue) -> bytes:
    """Sorted keys, no spaces: the same document always hashes to the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def host_arch() -> str:
    """This host's architecture in OCI's spelling ("amd64", "arm64"; others as ``uname -m``)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def chain_keys(layer_digests: Sequence[str]) -> list[str]:
    """One key per layer naming it *with everything below it*: the OCI image spec's ChainID
    recursion (config.md, "Layer ChainID": ``sha256(parent + " " + layer)``), applied to the
    layer blob digests. A layer unpacked for overlayfs depends on the layers below it (a
    hardlink to a lower file copies that file up), so its directory is cached per chain."""
    out: list[str] = []
    for digest in layer_digests:
        out.append(
            "sha256:" + hashlib.sha256(f"{out[-1]} {digest}".encode()).hexdigest()
            if out
            else digest
        )
    return out
