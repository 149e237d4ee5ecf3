"""Images made from the built-in busybox image: its layers, one more layer, another config.

Why: VM tests need an image with something busybox lacks (a symlink, a missing directory,
an Entrypoint) that still has a shell and coreutils; this builds one in the store under
test, through the real OCI layout importer, without a registry.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .homes import unique
from .oci import layer_tar, oci_layout_files, write_dir

if TYPE_CHECKING:
    from boxlite_core.images.store import ImageStore


def busybox_derived(
    images: ImageStore,
    workdir: Path,
    *,
    entries: Sequence[dict[str, Any]] = (),
    config: dict[str, Any] | None = None,
    name: str | None = None,
) -> str:
    """Import busybox's layers plus a layer of ``entries`` (``oci.f``, ``oci.d``,
    ``oci.sym``…; none: no extra layer) with ``config`` over the defaults (see
    ``oci.oci_layout_files``) into ``images``; return the reference (``name`` or a unique
    ``img-…``). ``workdir`` holds the layout."""
    busybox = images.ensure_builtin("busybox")
    raw = []
    for layer in busybox.layers:
        data = images.blobs.path(layer.digest).read_bytes()
        raw.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    if entries:
        raw.append(layer_tar(list(entries)))
    files = oci_layout_files(raw, ref="derived", gzip_layers=False, config=config)
    files.pop("_manifest_digest")
    reference = name or unique("img")
    workdir.mkdir(parents=True, exist_ok=True)
    layout = write_dir(files, Path(workdir) / reference.replace(":", "_").replace("/", "_"))
    images.import_path(layout, name=reference)
    return reference
