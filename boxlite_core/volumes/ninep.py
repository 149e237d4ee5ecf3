"""9p (virtio-9p): QEMU's built-in file server, so there is nothing to start on the host.

Read-only is enforced by QEMU itself (``-fsdev ...,readonly=on`` refuses every write with
EROFS before it touches the host). Ownership: as root QEMU uses ``security_model=passthrough``
(guest uids land on the host as-is); unprivileged it uses ``none`` (files belong to the QEMU
user, who owns the volume). See the qemu backend for the device flags.

**No auto-idmap as root**: files the guest writes keep the guest's uid/gid on the host (guest
root → host root), whoever owns the volume. virtiofs gets auto-idmap by running its daemon in
an id-mapped user namespace; here the file server is QEMU itself, and a user namespace around
QEMU would change the ids of every device and file it opens, not just this share's — so we do
not do it. Use the virtiofs sharer (or run boxlite unprivileged) when ownership matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..models import Capability, HostShare, ShareSpec
from .base import VolumeSharer


class NinePSharer(VolumeSharer):
    """Shares through the VMM's own 9p server: no helper process, works everywhere QEMU does."""

    name = "9p"
    capability = Capability.NINEP
    guest_fstype = "9p"

    def start(self, shares: Sequence[HostShare], box_dir: Path) -> tuple[ShareSpec, ...]:
        return tuple(
            ShareSpec(
                tag=share.tag,
                host_path=Path(share.host_path),
                kind=self.name,
                read_only=share.read_only,
                uid=share.uid,
                gid=share.gid,
            )
            for share in shares
        )

    def stop(self, box_dir: Path) -> None:
        """Nothing runs on the host for 9p."""
