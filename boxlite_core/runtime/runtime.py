"""Runtime: the entry point. Owns the home directory, the database, images and plugins.

One Runtime per process is the intent, but several processes may share a home (the CLI and a
long-running program): everything durable lives in the database and the box directories, and
every state change goes through BoxStore's checked transitions.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import attrs

from ..channel.shimctl import warm_shim
from ..errors import BoxliteError, NotFoundError, StateError
from ..models import BoxOptions, BoxStatus
from ..plugins import PluginRegistry
from ..state.db import Database
from ..state.home import secure_home
from . import snapshots
from .box import Box
from .cleanup import session_leaders_naming, settle_abandoned, stop_box_processes, stop_leftovers
from .creation import create_box
from .link import BoxLink, gone_unwatched
from .records import BoxRecord
from .services import KitProvider, Services, default_kit_provider
from .snapshots import Snapshot
from .store import BoxStore
from .templates import TemplateStore

if TYPE_CHECKING:
    from ..images.store import ImageStore

log = logging.getLogger(__name__)

DEFAULT_HOME = "~/.boxlite"
#: counters always reported by metrics(), even before the first event
COUNTERS = ("boxes_created", "boxes_started", "boxes_failed", "boxes_stopped", "execs",
            "exec_errors")

#: statuses recovery checks for a VM that died while nobody watched
_WATCHED = frozenset({BoxStatus.RUNNING, BoxStatus.PAUSED, BoxStatus.STOPPING})


def default_home() -> Path:
    """``$BOXLITE_HOME``, else ``~/.boxlite``."""
    return Path(os.environ.get("BOXLITE_HOME") or DEFAULT_HOME).expanduser()


class Runtime:
    """Create, find and remove boxes.

    ``plugins``: a PluginRegistry, or an iterable of ``(name, plugin_module)`` added to the
    installed entry points (handy for embedding a private backend). ``kit_provider`` replaces
    the guest kit lookup (``(home, progress) -> GuestKit``); tests use it to fail that stage.
    ``standby_shim``: start a box's agent shim process when the box is created and when a
    start begins, before the box exists as a VM, so its Python and gRPC start-up (~0.25 s
    here) runs beside the start's own work (channel.shimctl.warm_shim). An unused one exits
    with this process.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        plugins: PluginRegistry | Iterable[tuple[str, object]] | None = None,
        kit_provider: KitProvider | None = None,
        recover: bool = True,
        standby_shim: bool = True,
    ) -> None:
        home_dir = (Path(home).expanduser() if home else default_home()).absolute()
        # private: the db holds -e values; an existing 0755 home is tightened with a notice
        secure_home(home_dir)
        for sub in ("boxes", "locks"):
            (home_dir / sub).mkdir(mode=0o700, exist_ok=True)
        db = Database(home_dir / "boxlite.db")
        if plugins is None:
            registry = PluginRegistry()
        elif isinstance(plugins, PluginRegistry):
            registry = plugins
        else:
            registry = PluginRegistry(extra_plugins=list(plugins))
        #: what boxes, the init pipeline and cleanup use; built once, handed down
        self.services = Services(
            home=home_dir, db=db, store=BoxStore(db), plugins=registry,
            kit_provider=kit_provider or default_kit_provider, standby_shim=standby_shim,
        )
        self._boxes: dict[str, Box] = {}
        if recover:
            self.recover()

    # -- plumbing --------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.services.home

    @property
    def db(self) -> Database:
        return self.services.db

    @property
    def store(self) -> BoxStore:
        return self.services.store

    @property
    def plugins(self) -> PluginRegistry:
        return self.services.plugins

    @property
    def kit_provider(self) -> KitProvider:
        return self.services.kit_provider

    @kit_provider.setter
    def kit_provider(self, provider: KitProvider) -> None:
        """Boxes created or first got afterwards use ``provider`` (tests fail that stage);
        Box objects already handed out keep the services they were made with."""
        self.services = attrs.evolve(self.services, kit_provider=provider)

    @property
    def images(self) -> ImageStore:
        """The image store, opened on first use."""
        return self.services.images

    def box_dir(self, box_id: str) -> Path:
        return self.services.box_dir(box_id)

    def lock_path(self, box_id: str) -> Path:
        return self.services.lock_path(box_id)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop agent connections and host-side helpers; running boxes keep running."""
        for box in list(self._boxes.values()):
            box.detach()
        self._boxes.clear()
        self.db.close()

    # -- boxes -----------------------------------------------------------------------------

    def create(self, options: BoxOptions | None = None, **kw: object) -> Box:
        """Persist a Configured box. Cheap checks happen here, so a typo fails before a boot.

        ``BoxOptions(snapshot=NAME)``: the box continues snapshot NAME's VM on its first start
        (its processes keep running; image, resources and volumes are the snapshot box's).
        See :func:`boxlite_core.runtime.creation.create_box` for what it raises.
        """
        if options is None:
            options = BoxOptions(**kw)
        elif kw:
            options = attrs.evolve(options, **kw)
        if self.services.standby_shim and not options.snapshot:  # a copy takes none
            warm_shim()  # the start that usually follows takes it
        record = create_box(self.services, options)
        box = Box(self.services, record)
        self._boxes[record.id] = box
        return box

    def get(self, id_or_name: str) -> Box:
        record = self.store.get(id_or_name)
        box = self._boxes.get(record.id)
        if box is None:
            box = self._boxes[record.id] = Box(self.services, record)
        return box

    def list(self, *, all: bool = True) -> list[BoxRecord]:
        records = self.store.list()
        if not all:
            records = [r for r in records if r.status.may_have_vm]
        return records

    def prune_hosts(self) -> list[tuple[str, str]]:
        """Let the backend of every other machine a box of this home is on delete what
        nothing there uses any more (``VmmBackend.prune``); (host, name) of what went. An
        unreachable machine is logged and skipped: its files wait for the next prune."""
        gone = []
        for backend, host in sorted({(r.backend, r.options.host) for r in self.store.list()
                                     if r.backend and r.options.host}):
            assert backend is not None and host is not None
            try:
                gone += [(host, name) for name in self.plugins.backend(backend, host).prune()]
            except BoxliteError as exc:
                log.warning("pruning %s on %s skipped: %s", backend, host, exc)
        return gone

    def host_problem(self, record: BoxRecord) -> str | None:
        """Why the machine ``record``'s box runs on cannot be reached now (its backend's
        probe there, reused for a while), or None: reachable, or the box is on this one."""
        if not record.options.host or not record.backend:
            return None
        try:
            result = self.plugins.probe(record.backend, record.options.host)
        except NotFoundError as exc:
            return str(exc)
        if result.available:
            return None
        return f"host {record.options.host} unreachable: {result.reason}"

    def remove(self, id_or_name: str, force: bool = False) -> None:
        """Delete a box: its VM (only with ``force`` if it has one), files and record.

        The work is the box's own (see :func:`boxlite_core.runtime.lifecycle.remove`); the
        runtime only forgets its Box object. Raises NotFoundError (no such box), StateError
        (running, paused or stopping, without ``force``)."""
        box = self.get(id_or_name)
        box.remove(force=force)
        self._boxes.pop(box.id, None)

    # -- snapshots and templates ------------------------------------------------------------

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first (``boxlite snapshot ls``)."""
        return self.services.snapshots.list()

    def snapshot(self, name: str) -> Snapshot:
        """One snapshot by name or id; NotFoundError naming ``boxlite snapshot ls``."""
        return self.services.snapshots.get(name)

    def remove_snapshot(self, name: str) -> None:
        """Delete a snapshot. StateError while a box's disk is an overlay on it (the boxes
        are named: remove them first); NotFoundError if there is none."""
        snap = self.services.snapshots.get(name)
        snapshots.remove(snap, self.services.snapshots, self.services.box_dirs())

    def images_in_use(self) -> frozenset[str]:
        """Digests of the images boxes and snapshots stand on: their disks are overlays on
        the image's cached base, so neither the image nor that base may go."""
        digests = {r.image_digest for r in self.list() if r.image_digest}
        digests |= {s.image_digest for s in self.snapshots() if s.image_digest}
        return frozenset(digests)

    def templates(self) -> TemplateStore:
        """The boot templates of this home (``boxlite templates ls|rm|prune``)."""
        return TemplateStore(self.home)

    def metrics(self) -> dict[str, int]:
        counters = {name: 0 for name in COUNTERS}
        counters.update(self.db.counters())
        counters["boxes_running"] = self.store.count(BoxStatus.RUNNING)
        return counters

    @contextlib.contextmanager
    def _box_lock_nowait(self, box_id: str) -> Iterator[bool]:
        """The box's lock if nobody holds it (True), else False at once: recovery never waits
        for, and never undoes, a start/stop/remove another process is running."""
        try:
            fh = self.lock_path(box_id).open("a")
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            yield True
        finally:
            fh.close()

    def _recover_leftovers(self, records: dict[str, BoxRecord]) -> list[str]:
        """Stop processes naming a box directory whose record says no VM can run
        (Configured/Stopped/Failed) or that has no record at all (removed by an older
        boxlite while its VM ran). One pass over /proc for all boxes."""
        changed = []
        for box_id, procs in session_leaders_naming(self.home / "boxes").items():
            record = records.get(box_id)
            if record is not None and record.status.may_have_vm:
                continue
            with self._box_lock_nowait(box_id) as got:
                if not got:
                    continue
                record = self.store.find(box_id) if record is not None else None
                if record is not None and record.status.may_have_vm:
                    continue
                if record is None:
                    if self.store.find(box_id) is not None:
                        continue  # created meanwhile: not ours to judge
                    log.warning("box %s: stopping pids %s left running after its record went",
                                box_id, [p for p, _ in procs])
                    stop_leftovers(procs)
                    self.lock_path(box_id).unlink(missing_ok=True)  # opened just for this
                    changed.append(box_id)
                    continue
                stopped = stop_box_processes(self.services, record, self.box_dir(box_id))
                if stopped:
                    log.warning("box %s (%s): stopped %s", record.name, record.status.value,
                                ", ".join(stopped))
                    changed.append(record.name)
        return changed

    def recover(self) -> list[str]:
        """Reconcile records with the processes their box directories name; return the names
        (or ids, for processes without a record) changed.

        Runs at startup: a host reboot or a killed QEMU leaves records saying Running; a
        killed starter leaves one saying Starting (abandoned: settled Failed after stopping
        what its box directory names); an older boxlite could leave a VM behind a Configured
        record or none. A Running (or Paused) record whose VM is gone becomes Failed, a
        Stopping one Stopped; one whose backend plugin is not loaded is left alone (it may be
        alive; we cannot tell). Boxes whose lock another process holds are skipped.
        """
        changed = []
        records = {r.id: r for r in self.store.list()}
        for record in records.values():
            if record.status is not BoxStatus.STARTING or not record.abandoned:
                continue
            with self._box_lock_nowait(record.id) as got:
                if not got:
                    continue
                with contextlib.suppress(NotFoundError):
                    current = self.store.get(record.id)
                    if current.abandoned:
                        settle_abandoned(self.services, current)
                        changed.append(record.name)
        changed += self._recover_leftovers(records)
        for record in self.store.list(set(_WATCHED)):
            try:
                backend = self.plugins.backend(record.backend or "", record.options.host)
            except Exception:
                continue
            problem = self.host_problem(record)
            if problem:
                # one bounded probe per machine (cached), not one stalled attach per box:
                # every command recovers, and a hung host's boxes each cost a full timeout
                log.warning("box %s: left as %s: %s", record.name, record.status.value,
                            problem)
                continue
            box_dir = self.box_dir(record.id)
            try:
                handle = backend.attach(box_dir)
            except Exception as exc:
                log.warning("box %s: attach failed during recovery: %s", record.name, exc)
                continue
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.release()
                continue
            BoxLink(self.services, record).teardown_host_side()
            unknown = gone_unwatched(record)
            try:
                if record.status is BoxStatus.STOPPING:
                    self.store.set_status(
                        record.id, BoxStatus.STOPPED, pid=None, stopped_at=time.time(),
                        state={"stop_reason": f"VM is gone (found at startup, was stopping): "
                                              f"{unknown}"},
                    )
                    self.db.bump("boxes_stopped")
                else:
                    self.store.set_status(
                        record.id, BoxStatus.FAILED, pid=None, stopped_at=time.time(),
                        error="VM is gone (found at startup)", failures=record.failures + 1,
                        state={"stop_reason": f"VM is gone (found at startup, was "
                                              f"{record.status.value}): {unknown}"},
                    )
                    self.db.bump("boxes_failed")
                changed.append(record.name)
            except (StateError, NotFoundError):
                continue  # another process settled it first
        return changed
