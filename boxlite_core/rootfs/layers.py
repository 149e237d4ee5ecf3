"""``layers``: per-layer directories shared read-only + a per-box ext4 upper disk; the guest
stacks them with overlayfs.

Each layer is unpacked once per host into HOME/cache/rootfs/layers/<hex>/ and shared by every
box using it. Whiteouts are stored the way overlayfs reads them — a char device 0/0 for a
deleted entry, ``trusted.overlay.opaque=y`` on an opaque directory — which needs root on the
host and a sharer that passes device nodes and trusted.* xattrs (virtiofsd run as root with
xattrs on; 9p with security_model=passthrough). The upper disk holds ``upper/`` and ``work/``
(overlayfs needs both on one fs); its ext4 is sparse, so unused space costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..diskspace import ensure_free
from ..images.layers import unpack_layer_for_overlay
from ..models import HostShare
from ..vmm.spec import DiskSpec
from .base import (
    GuestShare,
    LayersRootfs,
    RootfsArtifact,
    RootfsContext,
    RootfsStrategy,
)
from .util import MIB, file_lock, make_ext4, temp_dir_in

if TYPE_CHECKING:
    from ..images.model import Image

UPPER_NAME = "upper.ext4"
SERIAL = "bxupper"
DEFAULT_UPPER_MIB = 1024


def layer_cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "rootfs" / "layers"


def ensure_layer_dir(ctx: RootfsContext, digest: str) -> Path:
    """Return the unpacked directory of one layer, unpacking it once (under a lock)."""
    cache = layer_cache_dir(ctx.home)
    hexpart = digest.split(":", 1)[1]
    final = cache / hexpart
    if final.is_dir():
        return final
    with file_lock(cache / f"{hexpart}.lock"):
        if final.is_dir():
            return final
        # an unpacked layer is at least its archive's size (more once decompressed)
        ensure_free(cache, ctx.image_store.blobs.size(digest), f"unpacking layer {digest}")
        with temp_dir_in(cache, f"build-{hexpart[:12]}-") as work:
            tree = work / "tree"
            tree.mkdir(mode=0o755)
            unpack_layer_for_overlay(ctx.image_store.blobs, digest, tree)
            os.replace(tree, final)
    return final


class LayersStrategy(RootfsStrategy):
    """Read-only shared layer dirs (tags layer0..N, bottom first) + writable upper disk."""

    name = "layers"
    needs_sharer = True

    def prepare(self, image: Image, box_dir: Path, ctx: RootfsContext) -> RootfsArtifact:
        box_dir = Path(box_dir)
        box_dir.mkdir(parents=True, exist_ok=True)
        shares = []
        for i, layer in enumerate(image.layers):
            if ctx.progress:
                ctx.progress(f"layer {i + 1}/{len(image.layers)}", i / max(len(image.layers), 1))
            shares.append(HostShare(f"layer{i}", ensure_layer_dir(ctx, layer.digest), True))
        upper = box_dir / UPPER_NAME
        if not upper.is_file():
            with temp_dir_in(box_dir, ".upper-") as work:
                skel = work / "skel"
                for d in ("upper", "work"):
                    (skel / d).mkdir(parents=True, mode=0o755)
                size = (ctx.disk_size_mib or DEFAULT_UPPER_MIB) * MIB
                tmp = work / UPPER_NAME
                make_ext4(tmp, skel, size, label="boxupper")
                os.replace(tmp, upper)
        return RootfsArtifact(
            guest=LayersRootfs(tuple(GuestShare(s.tag) for s in shares), SERIAL),
            disks=(DiskSpec(upper, "raw", serial=SERIAL),),
            shares=tuple(shares),
        )

    def remove(self, box_dir: Path) -> None:
        try:
            (Path(box_dir) / UPPER_NAME).unlink()
        except FileNotFoundError:
            pass
