"""Volume sharers: how a host directory reaches the guest (virtiofs, 9p, a vendor's own).

A sharer runs on the host before the VM starts (e.g. one virtiofsd per share) and turns each
:class:`HostShare` into a :class:`ShareSpec` the backend knows how to attach. Read-only must be
enforced here, on the host side, not only by the guest's mount options.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from ..models import Capability, HostShare, ShareSpec


class VolumeSharer(abc.ABC):
    """Registered through ``boxlite_register_volume_sharers``."""

    #: name users pick with ``volume_sharer=`` and the ShareSpec ``kind`` backends see
    name: ClassVar[str] = ""
    #: the backend capability needed to attach this kind of share
    capability: ClassVar[Capability]
    #: filesystem type the guest agent mounts
    guest_fstype: ClassVar[str] = ""
    #: True when files the guest writes belong to the host directory's owner (auto-idmap);
    #: the conformance suite checks it only for sharers that declare it
    idmap: ClassVar[bool] = False

    def check(self) -> None:
        """Raise ToolMissingError/ConfigError if the host cannot serve shares (no virtiofsd…)."""

    @abc.abstractmethod
    def start(self, shares: Sequence[HostShare], box_dir: Path) -> tuple[ShareSpec, ...]:
        """Prepare every share of a box (start helper processes); return their specs in order."""

    def stop(self, box_dir: Path) -> None:
        """Stop whatever :meth:`start` left running for this box. Idempotent; must work from
        another process (read pids from ``box_dir``)."""
