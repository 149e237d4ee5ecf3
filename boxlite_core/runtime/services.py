"""Services: what a box, the init pipeline and the cleanup code need from the runtime.

Why not the Runtime itself: Box, the pipeline and cleanup used to hold the whole Runtime and
reach into it, while the Runtime imported them back (an import circle, and no way to tell
what a box really depends on). The Runtime builds one Services at construction and hands it
down; nothing below the Runtime imports the Runtime.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..plugins import PluginRegistry
from ..state.db import Database
from .store import BoxStore

if TYPE_CHECKING:
    from ..images.store import ImageStore
    from ..kit.model import GuestKit
    from .snapshots import SnapshotStore

#: ``progress(message, fraction)``: ``fraction`` in [0, 1], or None when unknown
ProgressFn = Callable[[str, "float | None"], None]
#: ``kit_provider(home, progress) -> GuestKit``: finds (or builds) the guest kit for a start
KitProvider = Callable[[Path, "ProgressFn | None"], "GuestKit"]


def default_kit_provider(home: Path, progress: ProgressFn | None) -> GuestKit:
    """The installed guest kit, built on first use (see :func:`boxlite_core.kit.ensure_kit`)."""
    from ..kit import ensure_kit

    return ensure_kit(home, progress=progress)


@attrs.frozen
class Services:
    """The runtime's shared parts, as one read-only bundle.

    ``home``: the absolute runtime home (``boxes/ID`` and ``locks/ID.lock`` live under it);
    ``db``: the home's database (counters, image index); ``store``: the box records;
    ``plugins``: the loaded backends, rootfs strategies and sharers; ``kit_provider``: where
    a start gets its guest kit; ``standby_shim``: start a box's agent shim ahead, at create
    and when a start begins (channel.shimctl.warm_shim). :attr:`images` opens the image
    store on first use (the CLI's light commands never pay for it).
    """

    home: Path
    db: Database
    store: BoxStore
    plugins: PluginRegistry
    kit_provider: KitProvider = default_kit_provider
    standby_shim: bool = False

    def box_dir(self, box_id: str) -> Path:
        """The box's directory: disks, sockets, console log, launch plan."""
        return self.home / "boxes" / box_id

    def lock_path(self, box_id: str) -> Path:
        """The per-box lock file that serialises start/stop/remove across processes."""
        return self.home / "locks" / f"{box_id}.lock"

    @functools.cached_property
    def images(self) -> ImageStore:
        """The image store, opened on first use."""
        from ..images.store import ImageStore

        return ImageStore(self.home, self.db)

    @functools.cached_property
    def snapshots(self) -> SnapshotStore:
        """The snapshot records and directories (``HOME/snapshots``)."""
        from .snapshots import SnapshotStore

        return SnapshotStore(self.db, self.home)

    def box_dirs(self) -> Iterator[tuple[str, Path]]:
        """(name, directory) of every box: whose disks a snapshot must not pull away."""
        for record in self.store.list():
            yield record.name, self.box_dir(record.id)
