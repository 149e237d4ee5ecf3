"""9p (virtio-9p): QEMU's built-in file server, so there is nothing to start on the host.

Read-only is enforced by QEMU itself (``-fsdev ...,readonly=on`` refuses every write with
EROFS before it touches the host). Ownership: as root QEMU uses ``security_model=passthrough``
(guest uids land on the host as-is); unprivileged it uses ``none`` (files belong to the QEMU
user, who owns the volume). See the qemu backend for the device flags.
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
