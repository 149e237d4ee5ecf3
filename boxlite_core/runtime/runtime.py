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
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs

from ..errors import ConfigError, NotFoundError, StateError
from ..images.registry.pull import ensure_image
from ..models import BoxOptions, BoxStatus
from ..plugins import PluginRegistry
from ..state.db import Database
from ..state.home import secure_home
from ..volumes.resolve import resolve_user_volumes
from .box import Box
from .capacity import check_capacity
from .cleanup import session_leaders_naming, settle_abandoned, stop_box_processes, stop_leftovers
from .records import BoxRecord, generated_name, new_box_id
from .store import BoxStore

log = logging.getLogger(__name__)

DEFAULT_HOME = "~/.boxlite"
#: counters always reported by metrics(), even before the first event
COUNTERS = ("boxes_created", "boxes_started", "boxes_failed", "boxes_stopped", "execs",
            "exec_errors")

KitProvider = Callable[[Path, Any], Any]


def default_home() -> Path:
    return Path(os.environ.get("BOXLITE_HOME") or DEFAULT_HOME).expanduser()


def _default_kit_provider(home: Path, progress: Any) -> Any:
    from ..kit import ensure_kit

    return ensure_kit(home, progress=progress)


class Runtime:
    """Create, find and remove boxes.

    ``plugins``: a PluginRegistry, or an iterable of ``(name, plugin_module)`` added to the
    installed entry points (handy for embedding a private backend). ``kit_provider`` replaces
    the guest kit lookup (``(home, progress) -> GuestKit``); tests use it to fail that stage.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        plugins: PluginRegistry | Iterable[tuple[str, object]] | None = None,
        kit_provider: KitProvider | None = None,
        recover: bool = True,
    ) -> None:
        self.home = (Path(home).expanduser() if home else default_home()).absolute()
        # private: the db holds -e values; an existing 0755 home is tightened with a notice
        secure_home(self.home)
        for sub in ("boxes", "locks"):
            (self.home / sub).mkdir(mode=0o700, exist_ok=True)
        self.db = Database(self.home / "boxlite.db")
        self.store = BoxStore(self.db)
        if plugins is None:
            self.plugins = PluginRegistry()
        elif isinstance(plugins, PluginRegistry):
            self.plugins = plugins
        else:
            self.plugins = PluginRegistry(extra_plugins=list(plugins))
        self.kit_provider: KitProvider = kit_provider or _default_kit_provider
        self._images: Any = None
        self._boxes: dict[str, Box] = {}
        if recover:
            self.recover()

    # -- plumbing --------------------------------------------------------------------------

    @property
    def images(self) -> Any:
        """The image store (boxlite_core.images.store.ImageStore), opened on first use."""
        if self._images is None:
            from ..images.store import ImageStore

            self._images = ImageStore(self.home, self.db)
        return self._images

    def box_dir(self, box_id: str) -> Path:
        return self.home / "boxes" / box_id

    def lock_path(self, box_id: str) -> Path:
        return self.home / "locks" / f"{box_id}.lock"

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

    def create(self, options: BoxOptions | None = None, **kw: Any) -> Box:
        """Persist a Configured box. Cheap checks happen here, so a typo fails before a boot."""
        if options is None:
            options = BoxOptions(**kw)
        elif kw:
            options = attrs.evolve(options, **kw)
        check_capacity(options)  # more CPUs/memory than the host has: refused, no record
        resolve_user_volumes(options.volumes)
        if options.rootfs not in self.plugins.strategy_names():
            raise ConfigError(
                f"rootfs={options.rootfs!r}: unknown rootfs strategy; known: "
                f"{', '.join(self.plugins.strategy_names()) or 'none'}"
            )
        if options.volume_sharer and options.volume_sharer not in self.plugins.sharer_names():
            raise ConfigError(
                f"volume_sharer={options.volume_sharer!r}: unknown volume sharer; known: "
                f"{', '.join(self.plugins.sharer_names()) or 'none'}"
            )
        # A registry reference that is not in the store is pulled here (pull-on-create);
        # local and built-in images never touch the network.
        image = ensure_image(self.images, options.image)
        backend = self.plugins.select_backend(options)
        box_id = new_box_id()
        name = options.name
        if name is None:
            for attempt in range(5):
                name = generated_name(box_id, attempt)
                if not self.store.name_taken(name):
                    break
        assert name is not None
        record = BoxRecord(
            id=box_id,
            name=name,
            status=BoxStatus.CONFIGURED,
            options=attrs.evolve(options, name=name),
            backend=backend,
            image=options.image,
            image_digest=getattr(image, "digest", None),
            rootfs=options.rootfs,
            state={"image_config": image.config.to_dict()} if hasattr(image, "config") else {},
        )
        record = self.store.insert(record)
        self.db.bump("boxes_created")
        self.plugins.notify("created", box=record.to_dict())
        box = Box(self, record)
        self._boxes[record.id] = box
        return box

    def get(self, id_or_name: str) -> Box:
        record = self.store.get(id_or_name)
        box = self._boxes.get(record.id)
        if box is None:
            box = self._boxes[record.id] = Box(self, record)
        return box

    def list(self, *, all: bool = True) -> list[BoxRecord]:
        records = self.store.list()
        if not all:
            records = [r for r in records if r.status.may_have_vm]
        return records

    def remove(self, id_or_name: str, force: bool = False) -> None:
        """Delete a box: its VM (only with ``force`` if running), files and record.

        Whatever the status, everything the box directory names (VM, agent shim, virtiofsd,
        any session leader whose argv names the directory) is stopped before the directory
        and the record go, so nothing is left running that ``ls`` can no longer show. A box
        another live process is starting is waited for (the per-box lock); one whose starter
        died is treated as failed. StateError for a running box without ``force``."""
        box = self.get(id_or_name)
        record = box.record
        with box.exclusive():
            record = box.refresh()
            if record.status is BoxStatus.STARTING:
                record = box._settle_abandoned(record)
            if record.status in (BoxStatus.RUNNING, BoxStatus.STOPPING):
                if not force:
                    raise StateError(
                        f"box {record.name} is {record.status.value}; stop it first "
                        f"(`boxlite stop {record.name}`) or remove with -f"
                    )
                box.stop(timeout=5)
            box_dir = self.box_dir(record.id)
            box.detach()
            stop_box_processes(self, box.refresh(), box_dir)
            with contextlib.suppress(NotFoundError):
                strategy = self.plugins.rootfs_strategy(record.rootfs)
                try:
                    strategy.remove(box_dir)
                except Exception as exc:
                    log.warning("box %s: rootfs strategy remove failed: %s", record.name, exc)
            shutil.rmtree(box_dir, ignore_errors=True)
            self.store.delete(record.id)
        self._boxes.pop(record.id, None)
        self.lock_path(record.id).unlink(missing_ok=True)

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
                stopped = stop_box_processes(self, record, self.box_dir(box_id))
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
        record or none. A Running record whose backend plugin is not loaded is left alone (it
        may be alive; we cannot tell). Boxes whose lock another process holds are skipped.
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
                        settle_abandoned(self, current)
                        changed.append(record.name)
        changed += self._recover_leftovers(records)
        for record in self.store.list({BoxStatus.RUNNING, BoxStatus.STOPPING}):
            try:
                backend = self.plugins.backend(record.backend or "")
            except Exception:
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
            self.get(record.id).teardown_host_side()
            try:
                if record.status is BoxStatus.STOPPING:
                    self.store.set_status(
                        record.id, BoxStatus.STOPPED, pid=None, stopped_at=time.time(),
                        state={"stop_reason": "VM is gone (found at startup, was stopping)"},
                    )
                    self.db.bump("boxes_stopped")
                else:
                    self.store.set_status(
                        record.id, BoxStatus.FAILED, pid=None, stopped_at=time.time(),
                        error="VM is gone (found at startup)", failures=record.failures + 1,
                        state={"stop_reason": "VM is gone (found at startup)"},
                    )
                    self.db.bump("boxes_failed")
                changed.append(record.name)
            except (StateError, NotFoundError):
                continue  # another process settled it first
        return changed
