"""``layers``: per-layer directories shared read-only + a per-box ext4 upper disk; the guest
stacks them with overlayfs.

Each layer is unpacked once per host into HOME/cache/rootfs/layer-chains/<chain hex>/ and
shared by every box whose image has the same layers up to it (the directory depends on the
layers below: :func:`..images.oci.chain_keys`). Whiteouts are stored the way overlayfs reads
them — a char device 0/0 for a deleted entry, ``user.overlay.opaque=y`` on an opaque directory
(the guest mounts with ``userxattr``: ``trusted.*`` xattrs do not reach its overlayfs through
virtiofs or 9p) — which needs root on the host and a sharer that passes device nodes and
``user.*`` xattrs (virtiofsd with xattrs on; 9p with security_model=passthrough). A layer
whose root is opaque hides every layer below it, so those are left out of the stack
(overlayfs ignores the mark on a root). The upper disk holds ``upper/`` and ``work/``
(overlayfs needs both on one fs); its ext4 is sparse, so unused space costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..diskspace import ensure_free
from ..images.layers import unpack_layer_for_overlay
from ..images.oci import chain_keys
from ..images.overlay_view import visible_layers
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
    return Path(home) / "cache" / "rootfs" / "layer-chains"


def ensure_layer_dir(ctx: RootfsContext, digest: str, chain: str, lowers: list[Path]) -> Path:
    """Return the unpacked directory of layer ``digest`` on top of ``lowers`` (the
    directories of the layers below, bottom first; ``chain`` names them all), unpacking it
    once (under a lock)."""
    cache = layer_cache_dir(ctx.home)
    hexpart = chain.split(":", 1)[1]
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
            unpack_layer_for_overlay(
                ctx.image_store.blobs, digest, tree, lowers=list(reversed(lowers))
            )
            os.replace(tree, final)
    return final


class LayersStrategy(RootfsStrategy):
    """Read-only shared layer dirs (tags layer0..N, bottom first) + writable upper disk."""

    name = "layers"
    needs_sharer = True

    def prepare(self, image: Image, box_dir: Path, ctx: RootfsContext) -> RootfsArtifact:
        box_dir = Path(box_dir)
        box_dir.mkdir(parents=True, exist_ok=True)
        dirs: list[Path] = []
        digests = [layer.digest for layer in image.layers]
        for i, (digest, chain) in enumerate(zip(digests, chain_keys(digests), strict=True)):
            if ctx.progress:
                ctx.progress(f"layer {i + 1}/{len(digests)}", i / max(len(digests), 1))
            dirs.append(ensure_layer_dir(ctx, digest, chain, dirs))
        shares = [HostShare(f"layer{i}", d, True) for i, d in enumerate(visible_layers(dirs))]
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
