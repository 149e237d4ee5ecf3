"""Snapshots of running boxes, and the boxes that continue from them (``create --snapshot``,
``fork``).

A snapshot is a directory ``HOME/snapshots/<name>/`` and a row in the state database:

* ``vm/`` — the VM's memory and device state (``VmHandle.save_state``), sealed
  (:mod:`.savedstate`);
* ``disk-<serial>.qcow2`` — each writable disk of the box frozen at that instant. Nothing is
  copied: the frozen file is the box's own overlay (a hard link to its inode), and the box
  went on writing to a new overlay backed by it (``DiskSwitch``). A box created from the
  snapshot gets its own overlay backed by the same frozen file, so clones diverge: what one
  writes neither the source nor a sibling sees.

So the source box and every clone depend on the snapshot's disks: ``snapshot rm`` refuses
while any box's disk chain (read from the qcow2 headers) passes through them, naming the
boxes. Volumes are not captured: QEMU cannot save a VM while a 9p share is mounted in the
guest, nor ever with virtiofs (QEMU < 8.2), so a box with volumes (or a rootfs served as a
share) cannot be snapshotted; it is refused up front with that reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..diskspace import MIB, ensure_free
from ..errors import ConfigError, NotFoundError, StateError, UnsupportedError
from ..models import BoxOptions, BoxStatus, JsonObject
from ..rootfs import qcow2
from ..vmm.spec import Capability, DiskSwitch
from .savedstate import SavedState, load, remove_sealed, seal

if TYPE_CHECKING:
    from ..state.db import Database
    from ..vmm.base import VmHandle, VmmBackend
    from .records import BoxRecord

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"
STATE_SUBDIR = "vm"
LOCK_NAME = ".lock"
#: bytes beyond the guest's memory a save needs room for (device state, manifests)
SAVE_MARGIN = 64 * MIB


@attrs.frozen
class Snapshot:
    """One snapshot as ``snapshot ls`` shows it; ``options`` are its box's (a clone's)."""

    name: str
    id: str
    box_id: str
    box_name: str
    backend: str
    created_at: float
    directory: Path
    options: BoxOptions
    image_digest: str | None
    image_config: JsonObject | None
    #: frozen disk files in ``directory``, by the disk's virtio serial
    disks: tuple[tuple[str, str], ...]
    complete: bool = True
    auto: bool = False

    @property
    def state_dir(self) -> Path:
        """The sealed VM state (``VmHandle.save_state``'s files and the core's manifest)."""
        return self.directory / STATE_SUBDIR

    def to_dict(self) -> JsonObject:
        """What ``boxlite snapshot ls --json`` prints for it."""
        size = 0
        for path in self.directory.rglob("*") if self.directory.is_dir() else []:
            with contextlib.suppress(OSError):
                size += path.stat().st_blocks * 512  # what it takes on disk (qcow2: sparse)
        return {
            "name": self.name,
            "id": self.id,
            "box": self.box_name,
            "box_id": self.box_id,
            "backend": self.backend,
            "image": self.options.image,
            "image_digest": self.image_digest,
            "created_at": self.created_at,
            "complete": self.complete,
            "auto": self.auto,
            "path": str(self.directory),
            "disk_usage_bytes": size,
        }

    def _record(self) -> JsonObject:
        return {
            "options": self.options.to_dict(),
            "image_digest": self.image_digest,
            "image_config": self.image_config,
            "disks": [list(d) for d in self.disks],
            "directory": str(self.directory),
            "auto": self.auto,
        }


class SnapshotStore:
    """Snapshot rows in the home's database, and their directories."""

    def __init__(self, db: Database, home: Path) -> None:
        self.db = db
        self.root = Path(home) / SNAPSHOTS_DIR

    @contextlib.contextmanager
    def lock(self, *, shared: bool) -> Iterator[None]:
        """``HOME/snapshots/.lock``: taking a snapshot or creating a box from one holds it
        shared, removing one exclusive, so a disk is never deleted while a box is being put
        on it (or a half-taken snapshot mistaken for an unused one)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _from_row(self, row: sqlite3.Row) -> Snapshot:
        data = json.loads(row["record_json"])
        return Snapshot(
            name=row["name"], id=row["id"], box_id=row["box_id"], box_name=row["box_name"],
            backend=row["backend"], created_at=row["created_at"],
            # derived, not stored: a copied home must never point at the original's files
            directory=self.root / row["name"], options=BoxOptions.from_dict(data["options"]),
            image_digest=data.get("image_digest"), image_config=data.get("image_config"),
            disks=tuple((str(a), str(b)) for a, b in data.get("disks", [])),
            complete=bool(row["complete"]), auto=bool(data.get("auto")),
        )  # fmt: skip

    def find(self, name: str) -> Snapshot | None:
        """The snapshot named ``name``, else the one whose id it is, else None."""
        conn = self.db.connection()
        row = conn.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
        if row is None:
            row = conn.execute("SELECT * FROM snapshots WHERE id = ?", (name,)).fetchone()
        return self._from_row(row) if row is not None else None

    def get(self, name: str) -> Snapshot:
        """Raises NotFoundError naming ``boxlite snapshot ls``."""
        snap = self.find(name)
        if snap is None:
            raise NotFoundError(f"no snapshot named {name!r}; `boxlite snapshot ls` lists them")
        return snap

    def list(self) -> list[Snapshot]:
        """Every snapshot row, oldest first (incomplete ones included: ``complete``)."""
        rows = self.db.connection().execute("SELECT * FROM snapshots ORDER BY created_at")
        return [self._from_row(r) for r in rows.fetchall()]

    def reserve(self, snap: Snapshot) -> None:
        """Insert ``snap`` (incomplete) so its name is taken while it is being saved.

        Raises:
            ConfigError: the name is taken.
        """
        try:
            with self.db.transaction() as tx:
                tx.execute(
                    "INSERT INTO snapshots (name, id, box_id, box_name, backend, created_at, "
                    "complete, record_json) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    (snap.name, snap.id, snap.box_id, snap.box_name, snap.backend,
                     snap.created_at, json.dumps(snap._record())),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise ConfigError(
                f"a snapshot named {snap.name} exists; pick another name or "
                f"`boxlite snapshot rm {snap.name}`"
            ) from None

    def mark_complete(self, name: str) -> None:
        """The save of ``name`` finished: it may be restored."""
        with self.db.transaction() as tx:
            tx.execute("UPDATE snapshots SET complete = 1 WHERE name = ?", (name,))

    def delete_row(self, name: str) -> None:
        """Forget ``name`` (its directory is the caller's to remove)."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM snapshots WHERE name = ?", (name,))


# -- taking one ------------------------------------------------------------------------------


def new_overlay(overlay: Path, backing: Path, size: int) -> None:
    """A qcow2 at ``overlay`` over the qcow2 ``backing``, ``size`` bytes, made without opening
    the backing (a VM may be writing it)."""
    qcow2.create_overlay(overlay, backing, "qcow2", size, open_backing=False,
                         why="create a qcow2 overlay for a snapshot")


def check(record: BoxRecord, backend: VmmBackend) -> str:
    """Refuse a snapshot of ``record`` that cannot work, before anything is touched; return
    the box's layout key (what a restore must match).

    Raises:
        UnsupportedError: the backend has no SNAPSHOT, the box has volumes or a shared
            rootfs, or its VM cannot be saved (the reason recorded at its start).
        StateError: the box is not running (or paused).
    """
    box = record.name
    if Capability.SNAPSHOT not in backend.capabilities():
        raise UnsupportedError(
            f"box {box}: backend {backend.name!r} cannot save a VM (it does not declare "
            "the 'snapshot' capability); use a backend that does (qemu, libvirt)"
        )
    if record.status not in (BoxStatus.RUNNING, BoxStatus.PAUSED):
        raise StateError(
            f"box {box} is {record.status.value}; a snapshot saves a running box: "
            f"`boxlite start {box}` first"
        )
    if record.options.volumes or record.state.get("sharer"):
        raise UnsupportedError(
            f"box {box} has volumes or a shared rootfs ({record.state.get('sharer')}); "
            "the VMM cannot save a VM while such a share is mounted in its guest (QEMU: 9p "
            "while mounted, virtiofs always before 8.2), and host directories are not part "
            "of a snapshot: snapshot a box without volumes"
        )
    key = record.state.get("layout_key")
    if not isinstance(key, str) or not key:
        why = record.state.get("layout_unsupported") or "started by an older boxlite: restart it"
        raise UnsupportedError(f"box {box}: its VM cannot be saved ({why})")
    return key


def take(
    record: BoxRecord,
    backend: VmmBackend,
    handle: VmHandle,
    disks: list[tuple[str, Path, str]],
    store: SnapshotStore,
    name: str,
    *,
    auto: bool = False,
) -> Snapshot:
    """Save box ``record``'s memory and disks as snapshot ``name``; the box goes on running
    (a paused box stays paused). See the module docs for what is captured. The caller holds
    the box's lock and has checked its VM (``handle``) runs; ``disks`` are the box's
    writable disks as (serial, path, format), from its launch plan.

    Raises:
        UnsupportedError, StateError: as :func:`check`.
        ConfigError: the name is taken or invalid.
        DiskSpaceError: not room for the VM's memory under ``HOME/snapshots``.
        EngineError: the VMM failed; the box is resumed and nothing is left of the snapshot,
            unless its disks were already switched (the snapshot stays, incomplete: the box
            now writes on top of its disks) or the VM is gone after its state was written (the
            snapshot stays, complete: ``create --snapshot`` continues that VM).
    """
    BoxOptions(snapshot=name)  # validates the name as any snapshot reference
    key = check(record, backend)
    box = record.name
    for _serial, path, fmt in disks:
        if fmt != "qcow2":
            raise UnsupportedError(f"box {box}: disk {path} is {fmt}, not qcow2: "
                                   "a snapshot freezes qcow2 disks only")
    image_config = record.state.get("image_config")
    snap = Snapshot(
        name=name, id=secrets.token_hex(6), box_id=record.id, box_name=box,
        backend=backend.name, created_at=time.time(), directory=store.root / name,
        options=record.options, image_digest=record.image_digest,
        image_config=image_config if isinstance(image_config, dict) else None,
        disks=tuple((s, f"disk-{s}.qcow2") for s, _p, _f in disks), auto=auto,
    )  # fmt: skip
    store.root.mkdir(mode=0o700, exist_ok=True)
    # the stream holds at most the guest's memory (zero pages are skipped)
    ensure_free(store.root, record.options.memory_mib * MIB + SAVE_MARGIN,
                f"snapshot {name} of box {box}")
    with store.lock(shared=True):
        store.reserve(snap)
        saving = False
        try:
            snap.directory.mkdir(mode=0o700)
            snap.state_dir.mkdir(mode=0o700)
            switches = []
            for serial, path, _fmt in disks:
                frozen = snap.directory / f"disk-{serial}.qcow2"
                os.link(path, frozen)  # the same inode: nothing copied
                overlay = path.with_name(path.name + ".next")
                new_overlay(overlay, frozen, qcow2.virtual_size(path))
                switches.append(DiskSwitch(serial, path, overlay))
            was_paused = record.status is BoxStatus.PAUSED
            saving = True  # from here the VM may write an overlay: never delete one
            handle.save_state(snap.state_dir, switch_disks=switches, resume=not was_paused)
            _seal(snap, key, record)
            store.mark_complete(name)
        except BaseException as exc:
            _after_failed_save(snap, store, handle, disks, key, record, saving, exc)
            raise
    return attrs.evolve(snap, complete=True)


def _seal(snap: Snapshot, key: str, record: BoxRecord) -> None:
    for _serial, filename in snap.disks:
        os.chmod(snap.directory / filename, 0o400)
    seal(snap.state_dir, {
        "snapshot": snap.name, "key": key, "backend": snap.backend,
        "kit_id": record.state.get("kit_id"), "box": record.name,
    })  # fmt: skip


def _after_failed_save(
    snap: Snapshot, store: SnapshotStore, handle: VmHandle,
    disks: list[tuple[str, Path, str]], key: str, record: BoxRecord, saving: bool,
    exc: BaseException,
) -> None:
    """Leave nothing a box needs deleted, and nothing useless kept (see :func:`take`)."""
    if not saving:
        for _serial, path, _fmt in disks:
            path.with_name(path.name + ".next").unlink(missing_ok=True)
    vm_gone = False
    with contextlib.suppress(Exception):
        vm_gone = not handle.is_running()
    if saving and vm_gone and any(snap.state_dir.iterdir()):
        # the VMM wrote the state, then lost the VM (libvirt's save ends the domain): this
        # snapshot is the only copy of it
        with contextlib.suppress(Exception):
            _seal(snap, key, record)
            store.mark_complete(snap.name)
            log.error("box %s: its VM is gone after the save (%s); snapshot %s holds it: "
                      "`boxlite create --snapshot %s` continues it", record.name, exc,
                      snap.name, snap.name)
            return
    if _disk_used_by(snap, [p for _s, p, _f in disks]):
        return  # the box now writes on top of the frozen disks: the snapshot stays
    store.delete_row(snap.name)
    remove_sealed(snap.directory)


def _disk_used_by(snap: Snapshot, path_list: list[Path]) -> bool:
    """Whether any of ``path_list`` (overlays) is backed by this snapshot's disks. A chain
    that cannot be read to its end counts as using it: a disk is never deleted on a guess."""
    frozen = {(snap.directory / f).resolve() for _s, f in snap.disks}
    for path in path_list:
        try:
            links = qcow2.chain(path, strict=True)
        except (OSError, ConfigError):
            if not path.exists():
                continue
            return True
        if any(p.resolve() in frozen for p in links[1:]):
            return True
    return False


# -- using one -------------------------------------------------------------------------------


def clone_disks(snap: Snapshot, box_dir: Path) -> None:
    """Give a new box its own overlays over the snapshot's frozen disks (before its first
    start, and again before a retry of a first start that failed: the restored VM's memory
    belongs with the frozen disks, not with what a failed attempt wrote). The rootfs
    strategy then finds its overlay in place. The caller holds ``store.lock(shared=True)``."""
    from ..rootfs.disk import OVERLAY_NAME, SERIAL

    box_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = {SERIAL: OVERLAY_NAME}
    for serial, filename in snap.disks:
        frozen = snap.directory / filename
        target = box_dir / names.get(serial, f"disk-{serial}.qcow2")
        new_overlay(target, frozen, qcow2.virtual_size(frozen))


def saved_state(snap: Snapshot) -> SavedState:
    """The sealed VM state of ``snap``, sizes checked.

    Raises:
        StateError: the snapshot is incomplete. StaleStateError: its files changed.
    """
    if not snap.complete:
        raise StateError(
            f"snapshot {snap.name} is incomplete (its save failed after the box's disks were "
            f"frozen); it cannot be restored: `boxlite snapshot rm {snap.name}` once no box "
            "uses it"
        )
    return load(snap.state_dir)


def dependants(snap: Snapshot, boxes: Iterator[tuple[str, Path]]) -> list[str]:
    """Names of the boxes (``(name, box_dir)``) whose disk chains pass through ``snap``."""
    out = []
    for name, box_dir in boxes:
        overlays = [p for p in box_dir.glob("*.qcow2") if p.is_file()]
        if _disk_used_by(snap, overlays):
            out.append(name)
    return out


def dependant_snapshots(snap: Snapshot, others: list[Snapshot]) -> list[str]:
    """Names of the snapshots whose frozen disks are overlays on ``snap``'s (a snapshot of a
    box created from ``snap``)."""
    return [o.name for o in others if o.name != snap.name
            and _disk_used_by(snap, [o.directory / f for _s, f in o.disks])]


def remove(snap: Snapshot, store: SnapshotStore, boxes: Iterator[tuple[str, Path]]) -> None:
    """Delete ``snap``'s directory and row.

    Raises:
        StateError: boxes or other snapshots still use its disks (named: remove them first).
    """
    with store.lock(shared=False):
        _remove(snap, store, boxes)


def _remove(snap: Snapshot, store: SnapshotStore, boxes: Iterator[tuple[str, Path]]) -> None:
    users = dependants(snap, boxes)
    if users:
        raise StateError(
            f"snapshot {snap.name} holds the disks of box(es) {', '.join(sorted(users))} "
            "(their disks are overlays on it); remove those boxes first"
        )
    later = dependant_snapshots(snap, store.list())
    if later:
        raise StateError(
            f"snapshot {snap.name} holds the disks of snapshot(s) {', '.join(sorted(later))} "
            "(taken of boxes created from it); remove those snapshots first"
        )
    store.delete_row(snap.name)
    remove_sealed(snap.directory)


def prune_auto(store: SnapshotStore, boxes: list[tuple[str, Path]]) -> list[str]:
    """Remove the snapshots ``fork`` took that nothing uses any more (their source and every
    copy are gone); returns their names. A snapshot whose disks cannot be read is kept."""
    removed = []
    with store.lock(shared=False):
        for snap in store.list():
            if not snap.auto or not snap.complete:  # an incomplete one may be being taken
                continue
            try:
                _remove(snap, store, iter(boxes))
            except StateError:
                continue
            removed.append(snap.name)
    return removed
