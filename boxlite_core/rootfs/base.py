"""Rootfs strategies: how an image becomes the container's root filesystem.

A strategy prepares host-side artifacts in the box directory and says, in :class:`RootfsArtifact`,
which disks the VM needs, which directories must be shared, and how the guest agent should
mount the result (:data:`GuestRootfs`). It never talks to the VM itself.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeAlias

import attrs

from ..models import HostShare, JsonObject
from ..vmm.spec import DiskSpec

if TYPE_CHECKING:
    from ..images.model import Image
    from ..images.store import ImageStore

ProgressFn = Callable[[str, float | None], None]


@attrs.frozen
class RootfsContext:
    """What a strategy may use: the runtime home (for caches), the image store, options."""

    home: Path
    image_store: ImageStore
    disk_size_mib: int | None = None
    progress: ProgressFn | None = None


# -- what the guest agent is told: the ``rootfs`` part of its Init request -----------------
# The agent runs from the built guest kit, so the JSON these produce (``init_request``) is a
# wire format: InitRequest's ``disk`` | ``share`` | ``layers`` (proto/agent.proto).


@attrs.frozen
class DiskRootfs:
    """The root is a filesystem on a block device the guest finds by its virtio serial."""

    serial: str
    fstype: str = "ext4"
    read_only: bool = False

    def init_request(self, sharer_fstype: str) -> JsonObject:
        """``{"disk": {"serial", "fstype", "read_only"}}``; ``sharer_fstype`` is unused."""
        return {"disk": {"serial": self.serial, "fstype": self.fstype or "ext4",
                         "read_only": self.read_only}}  # fmt: skip


@attrs.frozen
class GuestShare:
    """A host directory the guest mounts by ``tag`` (one of the artifact's ``shares``).

    ``fstype`` empty means the volume sharer's (``VolumeSharer.guest_fstype``: "9p",
    "virtiofs"): the strategy does not know which sharer the box gets. ``options`` are extra
    mount options (empty: the agent's defaults).
    """

    tag: str
    fstype: str = ""
    options: str = ""

    def share_request(self, sharer_fstype: str) -> JsonObject:
        """``{"tag", "fstype"[, "options"]}``: InitRequest's ``Share``."""
        out: JsonObject = {"tag": self.tag, "fstype": self.fstype or sharer_fstype}
        if self.options:
            out["options"] = self.options
        return out

    def init_request(self, sharer_fstype: str) -> JsonObject:
        """``{"share": {...}}``: the root is this share, mounted as is."""
        return {"share": self.share_request(sharer_fstype)}


@attrs.frozen
class LayersRootfs:
    """The root is an overlayfs: read-only shared ``layers`` (bottom first) under a writable
    upper/work directory on the disk with serial ``upper_serial``."""

    layers: tuple[GuestShare, ...]
    upper_serial: str
    upper_fstype: str = "ext4"

    def init_request(self, sharer_fstype: str) -> JsonObject:
        """``{"layers": {"layers": [Share...], "upper_serial", "upper_fstype"}}``."""
        return {"layers": {
            "layers": [layer.share_request(sharer_fstype) for layer in self.layers],
            "upper_serial": self.upper_serial,
            "upper_fstype": self.upper_fstype or "ext4",
        }}  # fmt: skip


#: how the guest agent finds and mounts the container root
GuestRootfs: TypeAlias = DiskRootfs | GuestShare | LayersRootfs


@attrs.frozen
class RootfsArtifact:
    """The prepared rootfs: what the VM needs attached and what the guest mounts.

    ``guest`` tells the agent where the root is (:data:`GuestRootfs`); ``disks`` are attached
    to the VM as they are; ``shares`` go through the box's volume sharer (the tags ``guest``
    names), before the user's volumes.
    """

    guest: GuestRootfs = attrs.field(
        validator=attrs.validators.instance_of((DiskRootfs, GuestShare, LayersRootfs))
    )
    disks: tuple[DiskSpec, ...] = ()
    shares: tuple[HostShare, ...] = ()

    def to_dict(self) -> JsonObject:
        """JSON for diagnostics; ``guest`` as the agent receives it (sharer fstype blank)."""
        return {
            "guest": self.guest.init_request(""),
            "disks": [d.to_dict() for d in self.disks],
            "shares": [s.to_dict() for s in self.shares],
        }


class RootfsStrategy(abc.ABC):
    """Registered through ``boxlite_register_rootfs_strategies``."""

    name: ClassVar[str] = ""
    #: True when the rootfs reaches the guest through a volume sharer (needs one)
    needs_sharer: ClassVar[bool] = False

    @abc.abstractmethod
    def prepare(self, image: Image, box_dir: Path, ctx: RootfsContext) -> RootfsArtifact:
        """Build (or reuse) this box's rootfs. Idempotent: a restart calls it again and must
        find and keep the box's existing writable state, never reset it.

        Raises:
            ImageError: the image cannot be unpacked (a bad layer), or the box's existing
                rootfs no longer fits its image (e.g. the cached base of its overlay is gone).
            DiskSpaceError: (boxlite_core.diskspace; an EngineError) too little free space
                for the build; nothing was written.
            ToolMissingError: (a ConfigError) a program the build needs (qemu-img,
                mkfs.ext4) is not installed.
            EngineError: such a program failed or timed out.
        """

    def remove(self, box_dir: Path) -> None:
        """Delete the box's rootfs artifacts (the box is being removed). Shared caches stay.

        Raises:
            Nothing for artifacts already gone (idempotent); OSError only when a file that
            exists cannot be removed.
        """
