"""The box lifecycle: start, stop, kill, pause, resume and remove, as checked transitions.

Every transition here runs under the box's lock (BoxLink.exclusive) and writes the record
through BoxStore's checked transitions, so two processes acting on one box serialise and
the loser sees the state the winner left. The states and their moves::

    configured ─start→ starting ─→ running ⇄ paused (pause / resume)
    running | paused ─stop→ stopping ─→ stopped;  kill: → stopped;  a dead VM: → failed
    stopped | failed ─start→ starting (a restart keeps the box's data)

This module owns removal too: Runtime.remove finds the box and calls :func:`remove`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from ..channel.shimctl import stop_shim, warm_shim
from ..errors import ConfigError, EngineError, NotFoundError, StateError, UnsupportedError
from ..models import BoxStatus, check_timeout
from ..vmm.base import VmHandle
from ..vmm.spec import Capability
from . import snapshots
from .cleanup import CleanupGuard, settle_abandoned, starter_is_elsewhere, stop_box_processes
from .link import ATTACH_TIMEOUT, BoxLink, paused_error
from .pipeline import StartContext, run_stages, writable_disks
from .records import BoxRecord, process_identity
from .services import ProgressFn, Services

log = logging.getLogger(__name__)

#: seconds a starter that released the box lock gets to finish exiting (see settle_starting)
STARTER_EXIT_GRACE = 5.0
#: seconds a forced stop (``rm -f``) gives the guest to shut down cleanly
REMOVE_STOP_TIMEOUT = 5.0
#: statuses with a VM that ``rm`` refuses to delete without ``force``
_LIVE = (BoxStatus.RUNNING, BoxStatus.PAUSED, BoxStatus.STOPPING)


def settle_starting(link: BoxLink, record: BoxRecord) -> BoxRecord:
    """A Starting record seen with the box lock held: its starter died (a live start
    holds the lock), so stop what the box directory names and mark it Failed.

    A dying process drops its locks before /proc shows it gone, so a starter that still
    looks alive gets a few seconds to finish exiting before this refuses.

    Raises StateError: the starter still lives without holding the lock."""
    deadline = time.monotonic() + STARTER_EXIT_GRACE
    while starter_is_elsewhere(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    if starter_is_elsewhere(record):
        starter = record.starter or {}
        raise StateError(
            f"box {link.name} is starting in process {starter.get('pid')} (stage "
            f"{record.stage}), which does not hold the box lock "
            f"{link.services.lock_path(link.id)}; wait for it, or end that process and retry"
        )
    link.detach()
    record = settle_abandoned(link.services, record)
    link.record = record
    return record


def start(link: BoxLink, progress: ProgressFn | None = None) -> None:
    """Boot the box (Configured, Stopped or Failed → Starting → Running). See Box.start."""
    services = link.services
    seen = link.refresh()
    if seen.status is BoxStatus.STARTING and starter_is_elsewhere(seen) and progress:
        with contextlib.suppress(Exception):
            progress(f"waiting: pid {(seen.starter or {}).get('pid')} is starting this "
                     f"box (stage {seen.stage})", None)
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.RUNNING:
            link.live_client()  # re-attach (or find it dead and say so)
            return
        if record.status is BoxStatus.PAUSED:
            raise paused_error(link.name, "start")
        if record.status is BoxStatus.STARTING:
            record = settle_starting(link, record)
        if not record.status.startable:
            raise StateError(
                f"box {link.name} is {record.status.value}; wait for it to finish stopping"
            )
        plugins = services.plugins
        backend_name = record.backend or plugins.select_backend(record.options)
        host = record.options.host
        backend = plugins.backend(backend_name, host)
        probe = plugins.probe(backend_name, host)  # cached: create's selection probed already
        if not probe.available:
            raise ConfigError(
                f"backend {backend_name!r} is not available "
                f"{f'on host {host}' if host else 'here'}: {probe.reason}"
                + (f"; {probe.fix}" if probe.fix else "")
            )
        if record.backend != backend_name:
            record = services.store.update(link.id, backend=backend_name)
        if link.dir.exists():  # what an earlier run left (an old boxlite, a crash)
            stop_box_processes(services, record, link.dir)
        snapshot_state = None
        from_snapshot = bool(record.options.snapshot and not record.state.get("snapshot_restored"))
        if from_snapshot:  # its first start continues the snapshot; later ones boot
            assert record.options.snapshot is not None
            snap = services.snapshots.get(record.options.snapshot)
            snapshot_state = snapshots.saved_state(snap)
            with services.snapshots.lock(shared=True):  # fresh disks for the saved memory
                snapshots.clone_disks(snap, link.dir)
        record = services.store.begin_start(link.id, process_identity())
        if services.standby_shim and not from_snapshot:  # a snapshot's copy takes none
            warm_shim()  # started ahead for this start's agent channel (none yet: start now)
        ctx = StartContext(
            services=services, record=record, box_dir=link.dir, backend=backend,
            progress=progress, snapshot_state=snapshot_state,
        )
        with CleanupGuard(ctx):
            run_stages(ctx)
            assert ctx.handle is not None and ctx.spec is not None
            image_config = ctx.image.config.to_dict() if ctx.image is not None else None
            record = services.store.set_status(
                link.id,
                BoxStatus.RUNNING,
                pid=ctx.handle.pid,
                started_at=time.time(),
                stopped_at=None,
                error=None,
                image_digest=ctx.image.digest if ctx.image is not None else record.image_digest,
                state={
                    "stage_timings": dict(ctx.timings),
                    "agent": ctx.spec.agent.to_dict(),
                    "sharer": ctx.sharer_name,
                    "kit_id": ctx.kit.kit_id if ctx.kit is not None else None,
                    "image_config": image_config or record.state.get("image_config"),
                    "boots": int(record.state.get("boots", 0)) + 1,
                    "boot": ctx.boot.to_dict(),
                    "layout_key": ctx.layout_key,
                    "layout_unsupported": ctx.layout_unsupported,
                    "snapshot_restored": bool(record.state.get("snapshot_restored"))
                    or from_snapshot,
                    "network": {"policy": record.options.network.describe(),
                                "ports": ctx.published},
                    "failed_stage": None,
                    "stop_reason": None,
                    "stage": None,  # started: no stage is running
                },
            )
        link.record = record
        link.handle, link.client, link.sharer_name = ctx.handle, ctx.client, ctx.sharer_name
    services.db.bump("boxes_started")
    services.plugins.notify("started", box=record.to_dict(), stage_timings=dict(ctx.timings))


def stop(link: BoxLink, timeout: float = 10.0) -> None:
    """Shut the guest down cleanly, then stop the VM. Idempotent. See Box.stop."""
    check_timeout("timeout", timeout, allow_zero=True)
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.STARTING:
            record = settle_starting(link, record)
        if record.status in (BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED):
            link.kill_vm()  # none should run; if an old start left one, it goes
            link.teardown_host_side()
            return
        was_paused = record.status is BoxStatus.PAUSED
        if record.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            record = link.services.store.set_status(link.id, BoxStatus.STOPPING)
        handle = link.handle or link.attach_handle()
        if handle is not None and handle.is_running():
            if was_paused:  # a frozen guest cannot sync its disks or power off
                with contextlib.suppress(Exception):
                    handle.resume()
            client = link.client
            if client is None:
                with contextlib.suppress(Exception):
                    client = link.connect(handle, timeout=min(timeout, ATTACH_TIMEOUT))
            if client is not None:
                with contextlib.suppress(Exception):
                    client.shutdown()
            if not handle.wait(timeout):
                handle.stop(timeout)
        link.teardown_host_side()
        link.settle(BoxStatus.STOPPED, "stopped on request")


def kill(link: BoxLink) -> None:
    """Stop the VM at once (no guest shutdown). See Box.kill."""
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.STARTING:
            record = settle_starting(link, record)
        link.kill_vm()
        link.teardown_host_side()
        if record.status not in (BoxStatus.FAILED, BoxStatus.CONFIGURED, BoxStatus.STOPPED):
            link.settle(BoxStatus.STOPPED, "killed on request")


def _require_pause(link: BoxLink) -> None:
    """Refuse up front, naming the backend, rather than let a handle raise halfway."""
    plugins = link.services.plugins
    record = link.record
    name = record.backend or plugins.select_backend(record.options)
    if Capability.PAUSE not in plugins.backend(name, record.options.host).capabilities():
        raise UnsupportedError(
            f"box {link.name}: backend {name!r} cannot pause a VM (it does not declare "
            "the 'pause' capability); use a backend that does (qemu, libvirt)"
        )


def _live_handle(link: BoxLink, status: BoxStatus) -> VmHandle:
    """The VM handle of a box whose record says ``status``; StateError if the VM is gone."""
    handle = link.handle or link.attach_handle()
    if handle is None or not handle.is_running():
        link.handle = handle
        raise StateError(
            f"box {link.name} is {status.value} but its VM is gone; see "
            f"`boxlite logs {link.name}`, then `boxlite stop {link.name}`"
        )
    link.handle = handle
    return handle


def pause(link: BoxLink) -> None:
    """Running → Paused (the VM's vCPUs frozen). A paused box: nothing to do. See Box.pause."""
    _require_pause(link)
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.PAUSED:
            return
        if record.status is not BoxStatus.RUNNING:
            raise StateError(
                f"box {link.name} is {record.status.value}, not running; start it first "
                f"(`boxlite start {link.name}`)"
            )
        handle = _live_handle(link, record.status)
        handle.pause()
        try:
            link.record = link.services.store.set_status(
                link.id, BoxStatus.PAUSED, expect={BoxStatus.RUNNING}
            )
        except BaseException:  # the record could not say paused: the VM must not be either
            with contextlib.suppress(Exception):
                handle.resume()
            raise


def resume(link: BoxLink) -> None:
    """Paused → Running. A running box: nothing to do. See Box.resume."""
    _require_pause(link)
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.RUNNING:
            return
        if record.status is not BoxStatus.PAUSED:
            raise StateError(
                f"box {link.name} is {record.status.value}, not paused; nothing to resume"
            )
        handle = _live_handle(link, record.status)
        handle.resume()
        link.record = link.services.store.set_status(
            link.id, BoxStatus.RUNNING, expect={BoxStatus.PAUSED}
        )


def remove(link: BoxLink, force: bool = False) -> None:
    """Delete a box: its VM (only with ``force`` if it has one), files, record and lock.

    Whatever the status, everything the box directory names (VM, agent shim, virtiofsd,
    any session leader whose argv names the directory) is stopped before the directory
    and the record go, so nothing is left running that ``ls`` can no longer show. A box
    another live process is starting is waited for (the per-box lock); one whose starter
    died is treated as failed.

    Raises StateError: running, paused or stopping, without ``force``."""
    services = link.services
    with link.exclusive():
        record = link.refresh()
        if record.status is BoxStatus.STARTING:
            record = settle_starting(link, record)
        if record.status in _LIVE:
            if not force:
                raise StateError(
                    f"box {record.name} is {record.status.value}; stop it first "
                    f"(`boxlite stop {record.name}`) or remove with -f"
                )
            stop(link, timeout=REMOVE_STOP_TIMEOUT)
        box_dir = link.dir
        link.detach()
        stop_box_processes(services, link.refresh(), box_dir)
        _forget_elsewhere(services, record, box_dir, force)
        with contextlib.suppress(NotFoundError):
            strategy = services.plugins.rootfs_strategy(record.rootfs)
            try:
                strategy.remove(box_dir)
            except Exception as exc:
                log.warning("box %s: rootfs strategy remove failed: %s", record.name, exc)
        shutil.rmtree(box_dir, ignore_errors=True)
        services.store.delete(record.id)
    services.lock_path(record.id).unlink(missing_ok=True)
    if record.options.snapshot or record.state.get("layout_key"):
        # a fork's snapshot goes with the last box on its disks (the source included)
        try:
            snapshots.prune_auto(services.snapshots, list(services.box_dirs()))
        except Exception as exc:  # the box is gone; a snapshot left is listed, not lost
            log.warning("removing fork snapshots nothing uses failed: %s", exc)


def _forget_elsewhere(services: Services, record: BoxRecord, box_dir: Path,
                      force: bool) -> None:
    """What the backend keeps for the box outside its directory (a remote host's volumes).
    Unreachable: the box stays, unless ``force`` (then what is there is left, and said)."""
    if not record.backend:
        return
    try:
        backend = services.plugins.backend(record.backend, record.options.host)
    except NotFoundError as exc:  # uninstalled since: nothing of it can be reached
        log.warning("box %s: %s; removing it here only", record.name, exc)
        return
    except (UnsupportedError, ConfigError) as exc:
        log.warning("box %s: its backend cannot reach %s (%s); removing it here only",
                    record.name, record.options.host, exc)
        return
    try:
        backend.forget(box_dir)
    except EngineError as exc:
        where = record.options.host or "this host"
        if not force:
            raise StateError(
                f"box {record.name}: cannot delete what backend {record.backend!r} keeps for "
                f"it on {where} ({exc}); nothing was removed: retry when it is reachable, or "
                "`rm -f` to forget the box here and leave that behind") from exc
        log.warning("box %s: left on %s, which could not be reached: %s", record.name,
                    where, exc)


def snapshot(link: BoxLink, name: str, *, auto: bool = False) -> snapshots.Snapshot:
    """Save a running (or paused) box as snapshot ``name``; it goes on as it was. See
    :func:`boxlite_core.runtime.snapshots.take` for what is captured and raised."""
    with link.exclusive():
        record = link.refresh()
        if record.status not in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            raise StateError(
                f"box {link.name} is {record.status.value}; a snapshot saves a running box: "
                f"`boxlite start {link.name}` first"
            )
        services = link.services
        backend = services.plugins.backend(record.backend or "", record.options.host)
        snapshots.check(record, backend)  # before anything is touched
        handle = _live_handle(link, record.status)
        # Saved with the shim attached, unlike a boot template: other processes' commands in
        # this box go on. A clone's agent may then serve the saved session until its shim
        # re-attaches the port (RESTORED_READY_RETRY, pipeline._connect)
        pid = handle.pid
        snap = snapshots.take(record, backend, handle, writable_disks(link.dir),
                              services.snapshots, name, auto=auto)
        if handle.pid != pid:
            # the save replaced the VM's process (libvirt restores a new QEMU): its agent
            # port is a new socket, so this process's connection and the shim go
            link.detach()
            stop_shim(link.dir)
        _step_clock(link)
        return snap


def _step_clock(link: BoxLink) -> None:
    """The source's clock stood still while its VM was paused for the save: set it (and
    add host entropy) again. Best effort: the snapshot is taken."""
    from ..channel.identity import host_identity

    if link.record.status is not BoxStatus.RUNNING:
        return
    try:
        link.live_client().reseed(host_identity())
    except Exception as exc:
        log.warning("box %s: could not set its clock after the snapshot: %s", link.name, exc)
