"""9p (virtio-9p): QEMU's built-in file server, so there is nothing to start on the host.

Read-only is enforced by QEMU itself (``-fsdev ...,readonly=on`` refuses every write with
EROFS before it touches the host).

**Nothing privileged crosses a writable 9p volume**: the backend serves a writable user volume
(owner recorded) with ``security_model=mapped-xattr`` (libvirt: ``accessmode="mapped"``), as
root or not. The owner,
group, mode (setuid/setgid included), device numbers and symlink-ness a guest gives a file live
in ``user.virtfs.*`` xattrs only; on the host every file the guest creates is a plain file or
directory of QEMU's user with mode ``fmode``/``dmode`` = 0644/0755 less QEMU's umask (the
qemu backend starts QEMU with umask 022, so 0644/0755), a guest ``mknod`` a plain file,
a guest symlink a plain file holding its target, and ``security.*`` xattrs are refused
(ENOTSUP). ``passthrough`` (the model as root before) landed a guest's setuid-root
binary and device nodes on the host as they were; ``none`` a setuid binary of QEMU's user.

**No auto-idmap** (``idmap = False``): QEMU runs as root in the qemu backend, so what the
guest writes belongs to root on the host: the volume's owner can read it (0644/0755) but not
change it in place (only delete or replace what sits directly in a directory they own).
Squashing to the owner would need QEMU's file server in a user namespace, and a user namespace
around QEMU would change the ids of every device and file it opens, not just this share's.
Use the virtiofs sharer when the owner must own what the box writes.

The price of mapped-xattr (measured): QEMU reads every symlink as a file holding its target,
so a symlink made **on the host** inside the volume fails in the guest with ELOOP ("Too many
levels of symbolic links"); symlinks the guest makes work. For that reason rootfs shares
(``merged``/``layers``: no owner, the box's own tree under the private boxlite home, full of
host-made symlinks) keep the old model (``passthrough`` as root), as do read-only shares
(nothing is written).

Left: an existing host file with the setuid bit in a share keeps it when the guest writes to
it (QEMU as root holds CAP_FSETID); virtiofs clears it (``modcaps=-fsetid``).

**Declared limitation** (:data:`OPEN_UNLINKED`, not ours to fix): QEMU's 9p server acts on a
file by its path, so once a file that is still open is unlinked, ``ftruncate`` and ``fchmod``
on its descriptor fail (the path is gone) — the pattern of temporary files, SQLite journals
and package managers. virtiofs (virtiofsd keeps an O_PATH fd per inode) does not lose them;
it stays the default wherever virtiofsd runs (runtime/pipeline.py SHARER_PREFERENCE).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..models import HostShare
from ..vmm.spec import Capability, ShareSpec
from .base import OPEN_UNLINKED_FD, Limitation, VolumeSharer

#: QEMU's 9p server works by path (hw/9pfs: a fid's setattr truncates/chmods its path)
OPEN_UNLINKED = Limitation(
    OPEN_UNLINKED_FD,
    "a file that is open but deleted loses ftruncate and fchmod through its descriptor "
    "(QEMU's 9p server works by path); use --sharer virtiofs (the default where virtiofsd "
    "is installed) when programs rely on that",
)


class NinePSharer(VolumeSharer):
    """Shares through the VMM's own 9p server: no helper process, works everywhere QEMU does."""

    name = "9p"
    capability = Capability.NINEP
    guest_fstype = "9p"
    limitations = (OPEN_UNLINKED,)

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
