"""Volume sharer ``vz-virtiofs``: virtiofs served by Virtualization.framework itself.

Why its own sharer: the core's ``virtiofs`` sharer starts one virtiofsd per share, a Linux
program that does not exist on macOS. Here the framework is the virtiofs server, so there is
nothing to start: this sharer only turns host shares into ShareSpecs the hvf backend attaches.
Read-only is enforced on the host by ``VZSharedDirectory(readOnly=True)``. Files written by
the guest belong to the user running the runner (the framework does no uid mapping).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from boxlite_core.models import HostShare
from boxlite_core.vmm.spec import Capability, ShareSpec
from boxlite_core.volumes.base import VolumeSharer


class VzVirtiofsSharer(VolumeSharer):
    name = "vz-virtiofs"
    capability = Capability.VIRTIOFS
    guest_fstype = "virtiofs"

    def start(self, shares: Sequence[HostShare], box_dir: Path) -> tuple[ShareSpec, ...]:
        return tuple(
            ShareSpec(tag=s.tag, host_path=s.host_path, kind=self.name,
                      read_only=s.read_only, uid=s.uid, gid=s.gid)
            for s in shares
        )

    def stop(self, box_dir: Path) -> None:
        """Nothing runs on the host for these shares; the VM's runner owns them."""
