"""Rootfs strategies: how an image becomes the container's root filesystem.

A strategy prepares host-side artifacts in the box directory and says, in :class:`RootfsArtifact`,
which disks the VM needs, which directories must be shared, and how the guest agent should
mount the result. It never talks to the VM itself.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ..models import DiskSpec, HostShare

if TYPE_CHECKING:
    from ..images.model import Image

ProgressFn = Callable[[str, float | None], None]


@attrs.frozen
class RootfsContext:
    """What a strategy may use: the runtime home (for caches), the image store, options."""

    home: Path
    image_store: Any  # boxlite_core.images.store.ImageStore
    disk_size_mib: int | None = None
    progress: ProgressFn | None = None


@attrs.frozen
class RootfsArtifact:
    """The prepared rootfs.

    ``guest`` is the ``rootfs`` part of the agent's Init request, one of:

    * ``{"disk": {"serial": S, "fstype": "ext4"}}``
    * ``{"share": {"tag": T}}`` (fstype comes from the volume sharer)
    * ``{"layers": {"lower": [T0, T1, ...], "upper_disk": S}}`` (bottom layer first)
    """

    guest: Mapping[str, Any]
    disks: tuple[DiskSpec, ...] = ()
    shares: tuple[HostShare, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "guest": dict(self.guest),
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
        find and keep the box's existing writable state, never reset it."""

    def remove(self, box_dir: Path) -> None:
        """Delete the box's rootfs artifacts (the box is being removed). Shared caches stay."""
