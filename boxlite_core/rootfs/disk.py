"""``disk`` (default): a cached ext4 base image per image digest + a per-box qcow2 overlay.

The base is built once per image (``mkfs.ext4 -d`` from the unpacked layers; no mount, no
root-only loop devices), made read-only and never written again: every box gets a qcow2
overlay backed by it, so a box's writes cost only what it writes and start-up costs one
``qemu-img create``. The ext4 has slack (25% + 32 MiB) for the box's writes; an overlay
bigger than the base (``disk_size_mib``) only helps after the guest runs ``resize2fs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..diskspace import ensure_free
from ..errors import ImageError
from ..images.layers import apply_layers_merged
from ..vmm.spec import DiskSpec
from . import qcow2
from .base import DiskRootfs, RootfsArtifact, RootfsContext, RootfsStrategy
from .util import MIB, ext4_size_for, file_lock, make_ext4, temp_dir_in, tree_usage

if TYPE_CHECKING:
    from ..images.model import Image

OVERLAY_NAME = "rootfs.qcow2"
SERIAL = "bxrootfs"
#: the virtual size of a box's overlay unless ``disk_size_mib`` or the image asks for more;
#: sparse (a qcow2 holds only what is written), and the ext4 inside keeps the base's size
OVERLAY_VIRTUAL_MIB = 8192


def base_cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "rootfs" / "disk"


def base_image_path(home: Path, image_digest: str) -> Path:
    return base_cache_dir(home) / f"{image_digest.split(':', 1)[1]}.ext4"


def ensure_base(image: Image, ctx: RootfsContext) -> Path:
    """Return the read-only ext4 base for ``image``, building it (once, under a lock)."""
    base = base_image_path(ctx.home, image.digest)
    if base.is_file():
        return base
    cache = base.parent
    with file_lock(cache / f"{base.stem}.lock"):
        if base.is_file():  # another process built it while we waited
            return base
        what = f"the ext4 base of image {image.digest}"
        # the unpacked layers take at least their archives' size (more once decompressed)
        ensure_free(cache, sum(layer.size for layer in image.layers), f"unpacking {what}")
        with temp_dir_in(cache, f"build-{base.stem[:12]}-") as work:
            root = work / "root"
            root.mkdir()
            apply_layers_merged(image, ctx.image_store.blobs, root, progress=ctx.progress)
            content, inodes = tree_usage(root)
            size = ext4_size_for(content, inodes)
            # the image is sparse: mkfs writes the content plus metadata and journal
            ensure_free(cache, min(size, content + content // 16 + inodes * 256 + 16 * MIB),
                        what)
            if ctx.progress:
                ctx.progress(f"building ext4 base ({size // MIB} MiB)", None)
            tmp_img = work / "base.ext4"
            make_ext4(tmp_img, root, size, label="boxrootfs", inodes=max(inodes * 2, 16384))
            os.chmod(tmp_img, 0o444)
            os.replace(tmp_img, base)
    return base


class DiskStrategy(RootfsStrategy):
    """Cached ext4 base + qcow2 copy-on-write overlay per box."""

    name = "disk"
    needs_sharer = False

    def prepare(self, image: Image, box_dir: Path, ctx: RootfsContext) -> RootfsArtifact:
        overlay = Path(box_dir) / OVERLAY_NAME
        if not overlay.is_file():
            base = ensure_base(image, ctx)
            # the guest sees this size, not the image's: boxes of every image then share one
            # device layout, and so one boot template (runtime/templates.py)
            size = max(base.stat().st_size, (ctx.disk_size_mib or OVERLAY_VIRTUAL_MIB) * MIB)
            Path(box_dir).mkdir(parents=True, exist_ok=True)
            ensure_free(box_dir, MIB, f"the qcow2 overlay {overlay}")
            qcow2.create_overlay(overlay, base.resolve(), "raw", size,
                                 why="create the box's qcow2 overlay")
        elif not base_image_path(ctx.home, image.digest).is_file():
            raise ImageError(
                f"box overlay {overlay} exists but its base image for {image.digest} is gone; "
                "the box's disk cannot be used: remove the box and create it again"
            )
        return RootfsArtifact(
            guest=DiskRootfs(SERIAL, "ext4"),
            disks=(DiskSpec(overlay, "qcow2", serial=SERIAL),),
        )

    def remove(self, box_dir: Path) -> None:
        for name in (OVERLAY_NAME, OVERLAY_NAME + ".tmp"):
            try:
                (Path(box_dir) / name).unlink()
            except FileNotFoundError:
                pass
