"""``merged``: one host directory per box with every layer applied, shared into the guest.

Simple and transparent (the host sees the box's files), at the price of a full copy of the
image per box and of going through a volume sharer (9p/virtiofs) for every file access.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..diskspace import ensure_free
from ..images.layers import apply_layers_merged
from ..models import HostShare
from .base import GuestShare, RootfsArtifact, RootfsContext, RootfsStrategy
from .util import file_lock

if TYPE_CHECKING:
    from ..images.model import Image

ROOTFS_DIR = "rootfs"
READY_MARKER = ".rootfs-ready"
TAG = "rootfs"


class MergedStrategy(RootfsStrategy):
    """All layers applied into BOX/rootfs (built in BOX/rootfs.tmp, then renamed)."""

    name = "merged"
    needs_sharer = True

    def prepare(self, image: Image, box_dir: Path, ctx: RootfsContext) -> RootfsArtifact:
        box_dir = Path(box_dir)
        root = box_dir / ROOTFS_DIR
        marker = box_dir / READY_MARKER
        box_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(box_dir / ".rootfs.lock"):
            if not (marker.is_file() and root.is_dir()):
                # no marker: never built or a build was interrupted — start from scratch
                tmp = box_dir / (ROOTFS_DIR + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(root, ignore_errors=True)
                tmp.mkdir(mode=0o755)
                ensure_free(box_dir, sum(layer.size for layer in image.layers),
                            f"unpacking image {image.digest} for the box")
                apply_layers_merged(image, ctx.image_store.blobs, tmp, progress=ctx.progress)
                os.replace(tmp, root)
                marker.write_text(image.digest + "\n")
        return RootfsArtifact(
            guest=GuestShare(TAG),
            shares=(HostShare(TAG, root, read_only=False),),
        )

    def remove(self, box_dir: Path) -> None:
        box_dir = Path(box_dir)
        for name in (ROOTFS_DIR, ROOTFS_DIR + ".tmp"):
            shutil.rmtree(box_dir / name, ignore_errors=True)
        for name in (READY_MARKER, ".rootfs.lock"):
            try:
                (box_dir / name).unlink()
            except FileNotFoundError:
                pass
