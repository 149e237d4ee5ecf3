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

import attrs

from ..models import HostShare
from ..vmm.spec import Capability, ShareSpec


@attrs.frozen
class Limitation:
    """A behaviour a sharer knowingly does not provide, declared so users are told and the
    conformance suite expects it (a declared limitation's test must fail: one that passes
    means the declaration is stale).

    ``name``: a stable id the suite gates on (e.g. ``"open-unlinked-fd"``); ``summary``: one
    line for users (printed by `boxlite run/create --sharer NAME`): what breaks, why, and
    what to use instead.
    """

    name: str
    summary: str


#: the limitation names boxlite knows (the conformance suite has a test for each): a file
#: open but unlinked keeps working through its descriptor (ftruncate, fchmod)
OPEN_UNLINKED_FD = "open-unlinked-fd"


class SharerLimitationWarning(UserWarning):
    """A box was created with a volume sharer that declares a :class:`Limitation`; the
    message is the sharer's name and the limitation's summary."""


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
    #: what this sharer knowingly lacks (see :class:`Limitation`); empty for a full one
    limitations: ClassVar[tuple[Limitation, ...]] = ()

    def check(self) -> None:
        """Check that the host can serve shares, before any box relies on it. Cheap; no
        process is started.

        Raises:
            ToolMissingError: (a ConfigError) the helper program is not installed (virtiofsd).
            ConfigError: it is installed but cannot serve here (e.g. QEMU's C virtiofsd
                without root); the message names the fix or another sharer.
            EngineError: the helper is there but does not run.
        """

    @abc.abstractmethod
    def start(self, shares: Sequence[HostShare], box_dir: Path) -> tuple[ShareSpec, ...]:
        """Prepare every share of a box (start helper processes); return their specs in order.

        ``shares`` holds the rootfs strategy's shares first (``guest_path`` None), then the
        user's volumes as resolved for this start (``guest_path`` set, owner's uid/gid known).

        Returns once every share is ready for the VMM to attach (e.g. each virtiofsd socket
        accepts). On failure, whatever was started for this box is stopped again.

        Raises:
            ToolMissingError, ConfigError: as :meth:`check` (the host cannot serve shares), or a
                share the sharer cannot serve as asked (e.g. a socket path over the unix limit,
                an owner id that cannot be mapped).
            EngineError: a helper process exited or did not get ready in time; the message
                carries its log's last lines.
        """

    def stop(self, box_dir: Path) -> None:
        """Stop whatever :meth:`start` left running for this box. Idempotent; must work from
        another process (read pids from ``box_dir``).

        Raises:
            Nothing on purpose: it runs on every teardown path, after the VM is gone; a helper
            already gone or a missing state file is not an error.
        """
