"""Backend ``libvirt``: the same boxes as ``qemu``, as transient domains of a libvirtd.

Why offer it: hosts that already run libvirt want every VM visible (and killable) through
``virsh``, audited by libvirt, and confined by its security drivers. The guest, the disks, the
agent channel and the console are exactly the ``qemu`` backend's; only the launcher differs.

This module imports without libvirt-python installed (``import libvirt`` happens inside the
methods), so a host without it sees the backend as *unavailable* with the fix, not a broken
plugin. Install it with ``pip install 'boxlite-qemu[libvirt]'``.

What :meth:`LibvirtBackend.attach` needs is in ``BOXDIR/vm.json``: URI, domain name, UUID and
the libvirt domain ID of this boot (a restarted box gets a new UUID and ID, so an old record
never adopts a newer VM).

Snapshots (``Capability.SNAPSHOT``, local daemons only: the state file is written and read by
the daemon, on its host) are libvirt's own save/restore of a domain. ``save_state`` is
``virDomainSaveFlags`` into ``directory/domain.save`` (libvirt stops the domain: QEMU exits),
the disk switches are plain renames while no QEMU holds the disks, then
``virDomainRestoreFlags`` brings the same domain back, running or paused. A plan with
``spec.restore_from`` restores a *new* domain from such a file with the new box's XML; libvirt
refuses a new name or UUID there (they are guest ABI to it), so launch restores from a
private copy of the image whose embedded XML carries the new box's name and UUID
(:func:`~.libvirt_xml.rebrand_save_header`). A save ends the domain for a few seconds and
brings it back under a new ID: ``BOXDIR/saving.json`` tells every other handle of the box
(other processes too) that it is being saved, not dead, and handles follow the domain by
its UUID.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import attrs

from boxlite_core.errors import ConfigError, EngineError, StateError, UnsupportedError
from boxlite_core.models import JsonObject, JsonValue
from boxlite_core.vmm.base import LaunchPlan, VmHandle, VmmBackend
from boxlite_core.vmm.consolelog import (
    BACKUPS,
    CONSOLE_SOCKET,
    WRITER_STATE,
    ensure_writer,
    start_writer,
    stop_writer,
    wait_writer,
)
from boxlite_core.vmm.kvm_access import KVM_DEV, KVM_FIX, QEMU_CONF, kvm_access_problem
from boxlite_core.vmm.spec import Capability, DiskSwitch, ProbeResult, VmSpec

from . import libvirt_remote
from .accel import host_accel
from .handle import migration_bound, write_state
from .libvirt_conn import (
    CLOSE_TIMEOUT,
    DAEMON_FIX,
    ENV_TIMEOUT,
    INSTALL_FIX,
    LibvirtTimeout,
    bounded,
    call_timeout,
    close_connection,
    default_uri,
    import_libvirt,
    is_local,
    is_session,
    open_connection,
)
from .libvirt_xml import (
    DEFAULT_VIRTIOFSD,
    DOMAIN_TYPES,
    MACHINES,
    SAVE_HEADER,
    SaveImageError,
    bound_sockets,
    build_domain_xml,
    disk_sources,
    domain_name,
    rebrand_save_header,
    save_data_length,
    with_uuid,
)

if TYPE_CHECKING:
    import libvirt

VM_FILE = "vm.json"
_POLL = 0.1
#: the libvirt domain type to use whatever the host offers (kvm, qemu, hvf)
ENV_DOMAIN_TYPE = "BOXLITE_LIBVIRT_DOMAIN_TYPE"
#: in a ``save_state`` directory: libvirt's save image (header + domain XML + QEMU stream)
SAVE_FILE = "domain.save"
#: beside it: what was saved and how long it took (``{"image", "image_bytes", "libvirt",
#: "save_seconds", "restore_seconds", "resumed"}``)
STATE_INFO = "libvirt-state.json"
#: in the box dir while a restore runs: the private, renamed copy of the save image
PRIVATE_IMAGE = "restore.save"
#: in the box dir while ``save_state`` runs (``{"pid", "started" (epoch s), "seconds"}``):
#: between libvirt's save and the restore the domain does not exist, and another process's
#: handle of the box must take that for a save in progress, not for a dead VM
SAVE_MARKER = "saving.json"
#: seconds ``save_state`` waits, after a timeout or Ctrl-C, for libvirt to cancel the save
#: (it then resumes the domain) or to finish it (then the domain is restored from the file)
_RESCUE_BOUND = 30.0
#: libvirt's virDomainState of a running domain
_RUNNING = 1
#: how QEMU's migration blockers read (lower case), as libvirt passes them on: a save refused
#: for what the VM is (a mounted 9p export, vhost-user, a non-migratable CPU), not a failure
_BLOCKER_MARKERS = ("migration is disabled", "blocked", "blocker", "non-migratable", "virtfs",
                    "vhost-user")

T = TypeVar("T")

# libvirt domain states (virDomainState) and shutoff/crashed reasons, for exit_reason()
_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown",
           5: "shutoff", 6: "crashed", 7: "pmsuspended"}
_SHUTOFF_REASONS = {0: "unknown", 1: "guest powered off", 2: "destroyed", 3: "crashed",
                    4: "migrated", 5: "saved", 6: "failed to start", 7: "restored from snapshot",
                    8: "daemon restarted"}


def save_bound(size_bytes: int, env: dict[str, str] | None = None) -> float:
    """Seconds libvirt may take to save (or restore) a guest of ``size_bytes`` of memory:
    the qemu backend's migration bound (30 s + the size at 20 MB/s, raised by
    ``BOXLITE_QMP_TIMEOUT``), raised further by ``BOXLITE_LIBVIRT_TIMEOUT`` when set.

    Raises:
        ConfigError: one of those variables is set to something else than seconds > 0.
    """
    limit = migration_bound(size_bytes)
    if (os.environ if env is None else env).get(ENV_TIMEOUT, "").strip():
        limit = max(limit, call_timeout(env))
    return limit


def _host_domain_type() -> tuple[str, str]:
    """(libvirt domain type, why): the qemu backend's accelerator choice. Never raises (it
    backs ``capabilities()``): a bad ``BOXLITE_ACCEL`` falls back to TCG, with the reason."""
    try:
        choice = host_accel()
    except ConfigError as exc:
        return "qemu", f"{exc}; using TCG"
    return {"kvm": "kvm", "hvf": "hvf"}.get(choice.accel, "qemu"), choice.reason


def _remote_domain_type(uri: str, arch: str) -> tuple[str, str]:
    """(kvm or qemu, why) for a remote daemon: kvm when it describes kvm domains for
    ``arch``. Never raises: an unreachable daemon gives qemu (its probe says the rest)."""
    try:
        libvirt = import_libvirt()
        conn = open_connection(uri)
    except (ImportError, EngineError) as exc:
        return "qemu", f"could not ask {uri} ({exc})"
    try:
        bounded("virConnectGetDomainCapabilities", uri, conn.getDomainCapabilities, None,
                arch, None, "kvm", 0)
        return "kvm", (f"{uri} offers kvm domains (set {ENV_DOMAIN_TYPE}=qemu if its KVM "
                       "cannot boot them)")
    except (libvirt.libvirtError, LibvirtTimeout) as exc:
        return "qemu", f"{uri} offers no kvm domains ({exc})"
    finally:
        close_connection(uri, conn)


def _pid_file(uri: str, name: str) -> Path | None:
    if not is_local(uri):
        return None
    if is_session(uri):
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        return Path(runtime) / "libvirt" / "qemu" / "run" / f"{name}.pid"
    return Path("/run/libvirt/qemu") / f"{name}.pid"


def _log_file(uri: str, name: str) -> Path | None:
    if not is_local(uri) or is_session(uri):
        return None
    return Path("/var/log/libvirt/qemu") / f"{name}.log"


def _read_pid(uri: str, name: str) -> int | None:
    path = _pid_file(uri, name)
    if path is None:
        return None
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _last_shutdown_reason(uri: str, name: str) -> str | None:
    """libvirt writes 'shutting down, reason=X' to the domain's log when QEMU goes away."""
    path = _log_file(uri, name)
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if "shutting down, reason=" in line:
            return line.split("shutting down, reason=", 1)[1].strip()
    return None


def _mark_saving(box_dir: Path | None, seconds: float) -> None:
    """Write ``BOXDIR/saving.json``: this process saves the box for at most ``seconds``."""
    if box_dir is not None:
        write_state(Path(box_dir) / SAVE_MARKER,
                    {"pid": os.getpid(), "started": time.time(), "seconds": seconds})


def _unmark_saving(box_dir: Path | None) -> None:
    if box_dir is not None:
        with contextlib.suppress(OSError):
            (Path(box_dir) / SAVE_MARKER).unlink(missing_ok=True)


def save_in_progress(box_dir: Path | None) -> bool:
    """True while some process saves this box (its :data:`SAVE_MARKER` exists, names a live
    process and is younger than its bound): the domain may be missing for seconds, and comes
    back under the same UUID. A marker left by a killed process counts for nothing."""
    if box_dir is None:
        return False
    try:
        record = json.loads((Path(box_dir) / SAVE_MARKER).read_text())
        pid, started, seconds = int(record["pid"]), float(record["started"]), \
            float(record["seconds"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if not 0 <= time.time() - started <= seconds:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _save_complete(image: Path) -> bool:
    """``image`` is a save image libvirt finished writing (its final magic, a QEMU stream)."""
    try:
        with open(image, "rb") as fh:
            total = save_data_length(fh.read(SAVE_HEADER.size))
            return os.fstat(fh.fileno()).st_size > total
    except (OSError, SaveImageError):
        return False


@attrs.frozen
class _ConsoleWriter:
    """The box's console writer (``BOXDIR/logwriter.json``), to start it again after a
    restore: the socket it reads, the log it writes, the log's cap and backups."""

    socket: Path
    out: Path
    max_bytes: int
    backups: int = BACKUPS

    def start(self, box_dir: Path) -> None:
        start_writer(box_dir, self.socket, self.out, self.max_bytes, self.backups,
                     append=True)


class LibvirtHandle(VmHandle):
    """One transient domain. Every call looks the domain up by UUID: it may be gone.

    The UUID is this boot's alone (a restarted box gets a new one); the libvirt ID is not
    stable: a save + restore (:meth:`save_state`, maybe by another process) brings the same
    domain back under a new ID and QEMU pid, which the handle then follows (from
    ``BOXDIR/vm.json``). While a save of the box runs (``BOXDIR/saving.json``) the missing
    domain counts as running, for that save's bound.
    """

    def __init__(self, uri: str, name: str, uuid: str, dom_id: int, pid: int | None,
                 box_dir: Path | None = None) -> None:
        self.uri = uri
        self.name = name
        self.uuid = uuid
        self.dom_id = dom_id
        self._pid = pid
        self.box_dir = box_dir
        self._conn: libvirt.virConnect | None = None
        self._reason: str | None = None

    # -- plumbing --------------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                if bounded("virConnectIsAlive", self.uri, self._conn.isAlive):
                    return self._conn
            close_connection(self.uri, self._conn)
            self._conn = None
        self._conn = open_connection(self.uri)
        return self._conn

    def _domain(self) -> libvirt.virDomain | None:
        """This boot's domain (its UUID), or None when it is gone or not active. A new ID
        means a save + restore of it (by any process): the handle follows it."""
        libvirt = import_libvirt()
        conn = self._connection()
        try:
            dom = self._call("virDomainLookupByUUIDString", conn.lookupByUUIDString, self.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise EngineError(f"libvirt domain {self.name}: lookup failed: {exc}") from exc
        dom_id = self._call("virDomainGetID", dom.ID)
        if dom_id < 0:  # defined but inactive: not a boot of ours that runs
            return None
        if dom_id != self.dom_id:
            self._follow(dom_id)
        return dom

    def _follow(self, dom_id: int) -> None:
        """This boot's domain now runs as ``dom_id`` (restored from a save): take its QEMU pid
        from ``vm.json`` once the restoring process wrote it there, else from libvirt's pid
        file (the record may lag the restore by milliseconds)."""
        pid = None
        if self.box_dir is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                record = json.loads((self.box_dir / VM_FILE).read_text())
                if record.get("uuid") == self.uuid and record.get("id") == dom_id:
                    pid = record.get("pid")
        self.dom_id = dom_id
        self._pid = pid if isinstance(pid, int) else _read_pid(self.uri, self.name)
        self._reason = None

    def _settled_domain(self) -> libvirt.virDomain | None:
        """:meth:`_domain`, after waiting out a save of this box in progress (another
        process's :meth:`save_state`: the domain comes back, or the save's bound passes)."""
        dom = self._domain()
        while dom is None and save_in_progress(self.box_dir):
            time.sleep(_POLL)
            dom = self._domain()
        return dom

    def _call(self, what: str, fn: Callable[..., T], *args: Any,
              timeout: float | None = None) -> T:
        """A bounded libvirt call (``timeout`` seconds, default :func:`call_timeout`); on a
        timeout the connection is dropped (a fresh one is opened next time) since the stuck
        call still holds it."""
        try:
            return bounded(what, self.uri, fn, *args, timeout=timeout)
        except LibvirtTimeout:
            self._conn = None
            raise

    def _note_gone(self) -> None:
        if self._reason is None:
            why = _last_shutdown_reason(self.uri, self.name)
            self._reason = (f"libvirt domain {self.name} is gone (libvirt: {why})" if why
                            else f"libvirt domain {self.name} vanished from {self.uri}")

    # -- VmHandle --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    def is_running(self) -> bool:
        """True while this boot's domain is active (running or paused), or while a save of
        the box is in progress (the domain is briefly missing, see :func:`save_in_progress`).

        Raises:
            EngineError: libvirt cannot be reached or does not answer (LibvirtTimeout).
        """
        dom = self._domain()
        if dom is None:
            if save_in_progress(self.box_dir):
                return True
            self._note_gone()
            return False
        libvirt = import_libvirt()
        try:
            active = bool(self._call("virDomainIsActive", dom.isActive))
        except libvirt.libvirtError:  # vanished between lookup and the call
            active = False
        if not active:
            if save_in_progress(self.box_dir):
                return True  # ended by the save a moment ago
            self._note_state(dom)
        return active

    def _note_state(self, dom: libvirt.virDomain) -> None:
        if self._reason is not None:
            return
        try:
            state, reason = self._call("virDomainGetState", dom.state)
        except LibvirtTimeout:
            raise
        except Exception:
            self._note_gone()
            return
        detail = _SHUTOFF_REASONS.get(reason, str(reason)) if state == 5 else str(reason)
        self._reason = f"libvirt domain {self.name} is {_STATES.get(state, state)} ({detail})"

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """ACPI shutdown, wait, then destroy. The runtime asks the agent to power off first."""
        dom = self._settled_domain()
        if dom is None:
            self._note_gone()
            self._finish_console()
            return
        libvirt = import_libvirt()
        with contextlib.suppress(libvirt.libvirtError):
            self._call("virDomainShutdown", dom.shutdown)
        if self.wait(timeout):
            self._finish_console()
            return
        self._destroy("stopped: did not power off within "
                      f"{timeout:g}s of an ACPI shutdown, destroyed")

    def kill(self) -> None:
        self._destroy("killed (virDomainDestroy)")

    def _finish_console(self) -> None:
        """The domain is gone: let the console writer copy QEMU's last console bytes (it ends
        when the socket closes), then make sure it has (pid + start time checked). A remote
        daemon's domain has no writer here (virtlogd writes its console)."""
        if self.box_dir is None or self.is_running():
            return
        wait_writer(self.box_dir, 2.0)
        stop_writer(self.box_dir)
        if not is_local(self.uri):
            libvirt_remote.stop_bridge(self.box_dir)

    def _destroy(self, reason: str) -> None:
        libvirt = import_libvirt()
        dom = self._settled_domain()
        if dom is None:
            self._note_gone()
            self._finish_console()
            return
        try:
            self._call("virDomainDestroy", dom.destroy)
        except libvirt.libvirtError as exc:
            if self._domain() is not None:
                raise EngineError(f"libvirt domain {self.name}: destroy failed: {exc}") from exc
        if self._reason is None:
            self._reason = f"libvirt domain {self.name} {reason}"
        self._finish_console()

    def exit_reason(self) -> str | None:
        if self._reason is None and not self.is_running():
            self._note_gone()
        return self._reason

    def pause(self) -> None:
        """virDomainSuspend: the domain's vCPUs halt, its QEMU stays.

        Raises:
            StateError: this boot's domain is gone.
            EngineError: libvirt refused the call, or did not answer in time (LibvirtTimeout).
        """
        dom = self._settled_domain()
        if dom is None:
            raise StateError(f"libvirt domain {self.name} is not running; cannot pause it")
        self._control("virDomainSuspend", dom.suspend)

    def resume(self) -> None:
        """virDomainResume. Raises as :meth:`pause`."""
        dom = self._settled_domain()
        if dom is None:
            raise StateError(f"libvirt domain {self.name} is not running; cannot resume it")
        self._control("virDomainResume", dom.resume)

    def _control(self, what: str, fn: Callable[[], object]) -> None:
        """A bounded libvirt call whose refusal is the VMM's failure (EngineError), not a
        libvirt-python exception escaping the contract."""
        libvirt = import_libvirt()
        try:
            self._call(what, fn)
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt domain {self.name}: {what} failed: {exc}") from exc

    def save_state(
        self,
        directory: Path,
        *,
        switch_disks: Sequence[DiskSwitch] = (),
        resume: bool = True,
        restores_share_memory: bool = False,
    ) -> None:
        """``virDomainSaveFlags`` into ``directory/domain.save``; the disk switches; then
        ``virDomainRestoreFlags`` of the same domain from that file, running if ``resume`` and
        it ran before, else paused.

        libvirt's save pauses the domain, writes the image and ends its QEMU: between the
        save and the restore the domain does not exist (a 512 MiB TCG guest here: 1.4-1.8 s
        saving, 0.5 s restoring, ~1.4 s under load), so another process's handle of this box
        would see it gone: ``BOXDIR/saving.json`` says a save runs (:func:`save_in_progress`),
        and the restored domain has a new libvirt ID and QEMU pid (recorded in
        ``BOXDIR/vm.json``; every handle of it follows). The switches are plain renames
        (``overlay`` onto ``path``) while no QEMU holds the disks; the restored QEMU opens
        ``path``, the overlay. The console writer is restarted (appending) and the agent
        socket is served again, as after a launch: the core reconnects its agent channel.

        The save and the restore are each bounded by :func:`save_bound` of the guest's memory
        (a 512 MiB guest: 57 s). If the save is cut short (that bound, or Ctrl-C), libvirt
        may still finish it and end the domain: the save job is aborted (libvirt then resumes
        the domain) or, when it completed anyway, the domain is restored from the file before
        the error goes on.

        Files written: ``domain.save`` (a 512 MiB guest: ~117 MiB) and ``libvirt-state.json``.
        ``restores_share_memory`` is ignored: libvirt's restore reads its image into the
        domain's memory (no shared memory image).

        Raises:
            UnsupportedError: a remote daemon (the image would be on its host), or QEMU
                refuses to migrate this VM (a 9p share mounted in the guest), with its reason.
            StateError: this boot's domain is not running.
            ConfigError: a switch names a serial this domain has no disk for, or a ``path``
                that is not that disk's file.
            EngineError: libvirt failed or timed out saving (the domain goes on as before:
                libvirt resumes it) or restoring (then the VM is gone and the message says
                its state is in ``directory/domain.save``), or a disk switch failed (the
                domain is restored first).
            KeyboardInterrupt: re-raised once the domain runs again (as above).
        """
        libvirt = import_libvirt()
        directory = Path(directory)
        if not is_local(self.uri):
            raise UnsupportedError(
                f"libvirt domain {self.name}: cannot save its state through the remote daemon "
                f"{self.uri} (the state file would be on that host); use a local libvirtd")
        dom = self._domain()
        if dom is None:
            raise StateError(f"libvirt domain {self.name} is not running; cannot save it")
        try:
            xml = self._call("virDomainGetXMLDesc", dom.XMLDesc, 0)
            was_running = self._call("virDomainGetState", dom.state)[0] == _RUNNING
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt domain {self.name}: cannot read it before saving: "
                              f"{exc}") from exc
        _check_switches(self.name, disk_sources(xml), switch_disks)
        try:
            limit = save_bound(self._call("virDomainGetMaxMemory", dom.maxMemory) * 1024)
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt domain {self.name}: cannot read its memory size "
                              f"before saving: {exc}") from exc
        writer = _writer_record(self.box_dir)
        image = directory / SAVE_FILE
        running = resume and was_running
        # save + restore + the console writer's drain; a killed saver's marker counts for
        # nothing (its pid is checked)
        _mark_saving(self.box_dir, 2 * limit + _RESCUE_BOUND + 5.0)
        try:
            started = time.monotonic()
            try:
                self._call("virDomainSaveFlags", dom.saveFlags, str(image), None, 0,
                           timeout=limit)
            except libvirt.libvirtError as exc:
                # libvirt lets a domain whose save failed run on; resume=False wants it paused
                if not resume and was_running:
                    with contextlib.suppress(Exception):
                        self._call("virDomainSuspend", dom.suspend)
                raise _save_error(self.name, exc) from exc
            except BaseException:
                # a timeout or Ctrl-C: the save may go on in libvirtd and end the domain
                self._rescue_save(dom, image, xml, writer, running=running, timeout=limit)
                raise
            saved = time.monotonic() - started
            failed = _switch_disks(switch_disks)
            started = time.monotonic()
            self._restore_self(image, xml, writer, running=running,
                               timeout=save_bound(image.stat().st_size))
        finally:
            _unmark_saving(self.box_dir)
        write_state(directory / STATE_INFO, {
            "image": SAVE_FILE,
            "image_bytes": image.stat().st_size,
            "libvirt": self.uri,
            "save_seconds": round(saved, 3),
            "restore_seconds": round(time.monotonic() - started, 3),
            "resumed": running,
        })
        if failed:
            raise EngineError(f"libvirt domain {self.name}: state saved and the domain "
                              f"restored, but {failed}")

    def _rescue_save(self, dom: libvirt.virDomain, image: Path, xml: str,
                     writer: _ConsoleWriter | None, *, running: bool, timeout: float) -> None:
        """After a save cut short (timeout, Ctrl-C): abort libvirt's save job (the domain
        then runs on, resumed by libvirt), or, if the save completed anyway and ended the
        domain, restore it from ``image``. Waits at most ``timeout`` + 30 s for libvirt.
        Anything else failing here is swallowed (the caller re-raises the original error),
        except a failed restore: its EngineError says where the state is."""
        libvirt = import_libvirt()
        with contextlib.suppress(Exception):
            self._call("virDomainAbortJob", dom.abortJob, timeout=CLOSE_TIMEOUT)
        deadline = time.monotonic() + timeout + _RESCUE_BOUND
        while True:
            try:
                current = self._domain()
                if current is None:
                    break  # the save ended the domain
                job = self._call("virDomainGetJobInfo", current.jobInfo,
                                 timeout=CLOSE_TIMEOUT)[0]
                if job == libvirt.VIR_DOMAIN_JOB_NONE:
                    return  # aborted (or failed): libvirt resumed the domain as it was
            except Exception:
                pass  # libvirt slow or stuck: ask again until the bound
            if time.monotonic() >= deadline:
                return
            time.sleep(_POLL)
        if _save_complete(image):
            self._restore_self(image, xml, writer, running=running,
                               timeout=save_bound(image.stat().st_size))

    def _restore_self(self, image: Path, xml: str, writer: _ConsoleWriter | None, *,
                      running: bool, timeout: float | None = None) -> None:
        """This box's own domain back from ``image`` (its own XML is the one inside), within
        ``timeout`` seconds (default :func:`call_timeout`).

        Raises:
            EngineError: libvirt refused or timed out, or anything else failed: the domain
                is gone and the message says its state is kept in ``image``.
        """
        libvirt = import_libvirt()
        if self.box_dir is not None:
            # the saved QEMU closed the console socket: its writer drains and exits
            wait_writer(self.box_dir, 2.0)
            stop_writer(self.box_dir)
        for sock in bound_sockets(xml):
            sock.unlink(missing_ok=True)
        if writer is not None and self.box_dir is not None:
            writer.start(self.box_dir)
        flags = libvirt.VIR_DOMAIN_SAVE_RUNNING if running else libvirt.VIR_DOMAIN_SAVE_PAUSED
        conn = self._connection()
        uri, uuid = self.uri, self.uuid
        try:
            self._call_late("virDomainRestoreFlags", conn.restoreFlags, str(image), None, flags,
                            on_abandoned=lambda _r: _destroy_late_uuid(uri, uuid),
                            timeout=timeout)
            dom = self._call("virDomainLookupByUUIDString", conn.lookupByUUIDString, uuid)
            self.dom_id = self._call("virDomainGetID", dom.ID)
        except BaseException as exc:
            if self.box_dir is not None:
                stop_writer(self.box_dir)
            self._reason = (f"libvirt domain {self.name} was saved but could not be restored "
                            f"({exc or type(exc).__name__}); the VM is stopped and its state "
                            f"is in {image}")
            if isinstance(exc, Exception):
                raise EngineError(self._reason) from exc
            raise
        self._pid = _read_pid(self.uri, self.name)
        self._reason = None
        if self.box_dir is not None:
            _write_vm_file(self.box_dir, self)
            with contextlib.suppress(OSError):
                for sock in bound_sockets(xml):
                    if sock.name != CONSOLE_SOCKET:
                        os.chmod(sock, 0o600)

    def _call_late(self, what: str, fn: Callable[..., T], *args: Any,
                   on_abandoned: Callable[[T], None], timeout: float | None = None) -> T:
        """:meth:`_call` whose result, if it comes after the bound, goes to ``on_abandoned``."""
        try:
            return bounded(what, self.uri, fn, *args, on_abandoned=on_abandoned,
                           timeout=timeout)
        except LibvirtTimeout:
            self._conn = None
            raise

    def release(self) -> None:
        if self._conn is not None:
            close_connection(self.uri, self._conn)
            self._conn = None

    def to_dict(self) -> dict[str, Any]:
        return {"backend": "libvirt", "uri": self.uri, "name": self.name, "uuid": self.uuid,
                "id": self.dom_id, "pid": self._pid}


class LibvirtBackend(VmmBackend):
    """Transient libvirt domains built from the same VmSpec as the ``qemu`` backend."""

    name: ClassVar[str] = "libvirt"

    def __init__(self, uri: str | None = None, *, domain_type: str | None = None,
                 arch: str | None = None, virtiofsd: str = DEFAULT_VIRTIOFSD) -> None:
        self.uri = uri or default_uri()
        self._domain_type = domain_type
        self._domain_type_reason = "given by the caller" if domain_type else ""
        self.arch = arch or platform.machine()
        self.virtiofsd = virtiofsd
        #: where the daemon's QEMU user/group come from (a test points it elsewhere)
        self.qemu_conf = QEMU_CONF
        self.kvm_dev = KVM_DEV
        self._compat: str | None = None

    @property
    def domain_type(self) -> str:
        """``BOXLITE_LIBVIRT_DOMAIN_TYPE`` if set; for a local daemon kvm only where KVM
        really boots a guest (the qemu backend's probe), else qemu (TCG); for a remote one
        kvm when its daemon offers kvm domains, else qemu. Probed once per instance so every
        plan of this backend is the same."""
        if self._domain_type is None:
            forced = os.environ.get(ENV_DOMAIN_TYPE, "").strip()
            if forced:
                if forced not in DOMAIN_TYPES:
                    raise ConfigError(f"{ENV_DOMAIN_TYPE}={forced!r}: must be one of "
                                      f"{', '.join(DOMAIN_TYPES)}")
                self._domain_type, self._domain_type_reason = forced, f"{ENV_DOMAIN_TYPE}"
            elif is_local(self.uri):
                self._domain_type, self._domain_type_reason = _host_domain_type()
            else:
                self._domain_type, self._domain_type_reason = _remote_domain_type(
                    self.uri, self.arch)
        return self._domain_type

    @property
    def seclabel(self) -> str:
        # a session daemon cannot run QEMU as root; it runs as the user and chowns nothing
        return "none" if is_session(self.uri) else "root"

    def capabilities(self) -> frozenset[Capability]:
        accel = {"kvm": Capability.KVM, "hvf": Capability.HVF}.get(self.domain_type,
                                                                   Capability.TCG)
        caps = {
            Capability.NINEP, Capability.VIRTIOFS, Capability.QCOW2, Capability.RAW,
            Capability.VIRTIO_SERIAL, Capability.ATTACH, Capability.PAUSE, Capability.NETWORK,
            accel,
        }
        if is_local(self.uri):
            # the daemon writes and reads the state file on its own host
            caps.add(Capability.SNAPSHOT)
        else:
            # 9p of that machine's directories (its QEMU serves them); virtiofsd would be a
            # process of ours, here
            caps.discard(Capability.VIRTIOFS)
        return frozenset(caps)

    def probe(self) -> ProbeResult:
        details: dict[str, Any] = {"uri": self.uri}
        try:
            libvirt = import_libvirt()
        except ImportError as exc:
            return ProbeResult(False, reason=f"libvirt-python is not installed ({exc})",
                               fix=INSTALL_FIX, details=details)
        uri = self.uri
        try:
            conn = bounded("virConnectOpen", uri, libvirt.open, uri)
        except libvirt.libvirtError as exc:
            return ProbeResult(
                False, reason=f"libvirt daemon not reachable at {uri}: {exc}",
                fix=DAEMON_FIX, details=details)
        except LibvirtTimeout as exc:
            return ProbeResult(False, reason=str(exc), fix=DAEMON_FIX, details=details)
        try:
            details["libvirt_version"] = _version(
                bounded("virConnectGetLibVersion", uri, conn.getLibVersion))
            with contextlib.suppress(libvirt.libvirtError):
                details["hypervisor_version"] = _version(
                    bounded("virConnectGetVersion", uri, conn.getVersion))
            details["domain_type"] = self.domain_type
            details["domain_type_reason"] = self._domain_type_reason
            details["local"] = is_local(uri)
            try:
                bounded("virConnectGetDomainCapabilities", uri, conn.getDomainCapabilities,
                        None, self.arch, None, self.domain_type, 0)
            except LibvirtTimeout as exc:
                return ProbeResult(False, reason=str(exc), fix=DAEMON_FIX, details=details)
            except libvirt.libvirtError as exc:
                return ProbeResult(
                    False,
                    reason=f"libvirt at {self.uri} cannot run {self.arch} domains of type "
                           f"{self.domain_type!r}: {exc}",
                    fix="apt-get install qemu-system-x86 (and restart libvirtd)",
                    details=details)
        finally:
            close_connection(uri, conn)
        problem = self._kvm_access_problem()
        if problem:
            # usable, but every call re-probes QEMU and stalls: say so, and the fix
            details["kvm_access"] = problem
            return ProbeResult(True, reason=f"usable but slow: {problem}", fix=KVM_FIX,
                               details=details)
        return ProbeResult(True, details=details)

    def _kvm_access_problem(self) -> str | None:
        """Only a local system daemon runs QEMU as libvirt's QEMU user on this host's
        /dev/kvm; a session daemon runs it as the caller."""
        if not is_local(self.uri) or is_session(self.uri):
            return None
        return kvm_access_problem(self.kvm_dev, self.qemu_conf)

    def snapshot_compat(self, spec: VmSpec) -> str:
        """``libvirt=<version>; qemu=<emulator> <version> (<bytes> bytes, mtime <ns>);
        machine=<canonical machine>; type=<domain type>; arch=<arch>; seclabel=<mode>``:
        what a saved domain depends on beyond its device layout. The machine is libvirt's
        expansion of ``q35`` (e.g. ``pc-q35-7.2``), the one the saved XML names.

        Read from the daemon once per backend instance (later calls reuse it).

        Raises:
            UnsupportedError: a remote daemon, or a virtiofs share (QEMU 7.2's
                vhost-user-fs cannot migrate).
            EngineError: libvirt-python is not installed (with the pip fix); libvirtd is not
                reachable (with how to start it); it does not answer within
                ``BOXLITE_LIBVIRT_TIMEOUT`` (LibvirtTimeout, a subclass); or it cannot
                describe this host's QEMU (its domain capabilities are refused or unreadable).
        """
        self._refuse_unrestorable(spec)
        if self._compat is None:
            self._compat = self._read_compat()
        return self._compat

    def _read_compat(self) -> str:
        uri = self.uri
        try:
            libvirt = import_libvirt()
        except ImportError as exc:
            raise EngineError(f"backend 'libvirt' needs libvirt-python ({exc}); "
                              f"{INSTALL_FIX}") from exc
        conn = open_connection(uri)
        try:
            lib = _version(bounded("virConnectGetLibVersion", uri, conn.getLibVersion))
            qemu = _version(bounded("virConnectGetVersion", uri, conn.getVersion))
            caps = bounded("virConnectGetDomainCapabilities", uri, conn.getDomainCapabilities,
                           None, self.arch, MACHINES.get(self.arch), self.domain_type, 0)
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt at {uri} cannot describe its QEMU for {self.arch} "
                              f"({exc}); is qemu-system-{self.arch} installed?") from exc
        finally:
            close_connection(uri, conn)
        try:
            root = ET.fromstring(caps)
        except ET.ParseError as exc:
            raise EngineError(f"libvirt at {uri} described its QEMU in XML that does not parse "
                              f"({exc}); check libvirtd's version and log") from exc
        emulator = root.findtext("path") or "?"
        machine = root.findtext("machine") or MACHINES.get(self.arch, "?")
        try:
            st = os.stat(emulator)
            binary = f"{st.st_size} bytes, mtime {st.st_mtime_ns}"
        except OSError:
            binary = "not readable here"
        compat = (f"libvirt={lib}; qemu={emulator} {qemu} ({binary}); machine={machine}; "
                  f"type={self.domain_type}; arch={self.arch}; seclabel={self.seclabel}")
        if self.domain_type != "qemu":
            # host-passthrough: the guest saw this host's CPU model and features
            compat += f"; cpu={_host_cpu()}"
        return compat

    def _refuse_unrestorable(self, spec: VmSpec) -> None:
        if not is_local(self.uri):
            raise UnsupportedError(
                f"backend 'libvirt' at {self.uri} cannot save or restore a VM's state: the "
                "daemon is remote (its state files would be on its host); use a local "
                "libvirtd, or boot cold")
        for share in spec.shares:
            if share.kind == "virtiofs":
                raise UnsupportedError(
                    f"share {share.tag!r} is virtiofs: QEMU's vhost-user-fs device cannot be "
                    "migrated by QEMU < 8.2, so libvirt cannot save or restore this VM's "
                    "state; use 9p for its volumes, or boot it cold")

    def plan(self, spec: VmSpec) -> LaunchPlan:
        """The domain XML (plus where launch finds what it needs). With
        ``spec.restore_from``: ``restore_image``, the save image launch restores from
        (``virDomainRestoreFlags`` with this XML, under a new UUID) instead of createXML.

        Raises:
            UnsupportedError: ``spec.restore_from`` with a remote daemon or a virtiofs share.
            ConfigError: as ``VmmBackend.plan`` (see :func:`~.libvirt_xml.build_domain_xml`).
        """
        if spec.restore_from is not None:
            self._refuse_unrestorable(spec)
        # The console reaches our capped writer (the box's console_log_max_bytes holds) on a
        # socket: a local daemon's QEMU serves it; a remote box's stream bridge serves it
        # from the console stream. A remote box's files are pool volumes (libvirt_remote).
        console = spec.box_dir / CONSOLE_SOCKET
        remote = None if is_local(self.uri) else libvirt_remote.layout(spec)
        xml = build_domain_xml(spec, domain_type=self.domain_type, arch=self.arch,
                               seclabel=self.seclabel, virtiofsd=self.virtiofsd,
                               console_socket=console, remote=remote.files if remote else None)
        data: dict[str, JsonValue] = {
            "console_socket": str(console),
            "xml": xml,
            "uri": self.uri,
            "name": domain_name(spec.box_id),
            "domain_type": self.domain_type,
            "seclabel": self.seclabel,
        }
        machine = spec.guest.machine
        if machine and machine != "q35":
            data["machine_note"] = f"kit hint {machine!r} replaced by q35 (libvirt lacks microvm)"
        if spec.restore_from is not None:
            data["restore_image"] = str(Path(spec.restore_from) / SAVE_FILE)
        if remote is not None:
            data["remote"] = remote.to_json()
        return LaunchPlan(backend=self.name, spec=spec, data=data)

    def launch(self, plan: LaunchPlan) -> LibvirtHandle:
        if plan.backend != self.name:
            raise ConfigError(f"plan for backend {plan.backend!r} handed to {self.name!r}")
        libvirt = import_libvirt()
        uri = plan.data["uri"]
        name = plan.data["name"]
        spec = plan.spec
        conn = open_connection(uri)
        try:
            with contextlib.suppress(libvirt.libvirtError):
                old = bounded("virDomainLookupByName", uri, conn.lookupByName, name)
                state = bounded("virDomainGetState", uri, old.state)[0]
                raise StateError(
                    f"libvirt domain {name} already exists at {uri} (state "
                    f"{_STATES.get(state, '?')}); stop that box first, or remove it: "
                    f"virsh -c {uri} destroy {name}")
            # a stale socket would make connecting clients race the new QEMU's listen()
            spec.agent.socket.unlink(missing_ok=True)
            # Name the domain in the box dir *before* createXML: a process killed between the
            # domain's creation and the full record below would otherwise leave a VM that no
            # later `rm -f`/recovery can find (libvirt keeps transient domains after we go).
            _write_vm_record(spec.box_dir, {"backend": self.name, "uri": uri, "name": name,
                                            "uuid": None})
            remote = plan.data.get("remote")
            if isinstance(remote, dict):
                return self._launch_remote(plan, conn, libvirt_remote.RemoteLayout.from_json(
                    remote))
            console = plan.data.get("console_socket")
            if console:
                # first: the writer waits for QEMU to listen and connects while libvirt still
                # holds the vCPUs (-S), so no early console line is lost
                stop_writer(spec.box_dir)
                Path(str(console)).unlink(missing_ok=True)
                start_writer(spec.box_dir, Path(str(console)), spec.console_log,
                             spec.console_log_max_bytes)
            try:
                restore = plan.data.get("restore_image")
                if restore:
                    dom = _restore_domain(conn, uri, name, Path(str(restore)), plan)
                else:
                    # a createXML that answers after we gave up would leave an untracked
                    # VM; the abandoned call still uses conn, so its late handler closes it
                    late_conn = conn
                    dom = bounded("createXML", uri, conn.createXML, plan.data["xml"], 0,
                                  on_abandoned=lambda d: _destroy_late_domain(d, late_conn))
            except LibvirtTimeout:
                conn = None
                stop_writer(spec.box_dir)
                raise
            except BaseException as exc:
                stop_writer(spec.box_dir)
                if isinstance(exc, libvirt.libvirtError):
                    verb = "restore" if plan.data.get("restore_image") else "start"
                    raise EngineError(f"libvirt could not {verb} domain {name} at {uri}: {exc}"
                                      ) from exc
                raise
            try:
                handle = LibvirtHandle(uri, name, bounded("virDomainGetUUIDString", uri,
                                                          dom.UUIDString),
                                       bounded("virDomainGetID", uri, dom.ID),
                                       _read_pid(uri, name), spec.box_dir)
            except BaseException as exc:
                # the domain runs but could not be read back: nothing of it may stay behind
                with contextlib.suppress(Exception):
                    bounded("virDomainDestroy", uri, dom.destroy)
                stop_writer(spec.box_dir)
                if isinstance(exc, libvirt.libvirtError):
                    raise EngineError(f"libvirt domain {name} started but could not be read "
                                      f"back ({exc}); it was destroyed") from exc
                raise
        finally:
            if conn is not None:
                close_connection(uri, conn)
        if is_local(uri):
            with contextlib.suppress(OSError):
                os.chmod(spec.agent.socket, 0o600)
        _write_vm_file(spec.box_dir, handle)
        return handle

    def _launch_remote(self, plan: LaunchPlan, conn: libvirt.virConnect,
                       layout: libvirt_remote.RemoteLayout) -> LibvirtHandle:
        """launch() for a daemon on another host: the pool volumes first (uploads reported
        through ``plan.report``), then the domain, created paused so that the stream bridge
        holds its console before the guest prints a byte; resumed once the bridge and the
        log writer serve."""
        libvirt = import_libvirt()
        uri, name, spec = str(plan.data["uri"]), str(plan.data["name"]), plan.spec
        libvirt_remote.check_directories(conn, uri, [s.host_path for s in spec.shares])
        libvirt_remote.stage(conn, uri, layout, plan.report)
        plan.report(f"starting domain {name} on {uri}", None)
        late_conn = conn
        try:
            dom = bounded("createXML", uri, conn.createXML, plan.data["xml"],
                          libvirt.VIR_DOMAIN_START_PAUSED,
                          on_abandoned=lambda d: _destroy_late_domain(d, late_conn))
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt could not start domain {name} at {uri}: {exc}"
                              ) from exc
        console = spec.box_dir / CONSOLE_SOCKET
        try:
            uuid = bounded("virDomainGetUUIDString", uri, dom.UUIDString)
            handle = LibvirtHandle(uri, name, uuid, bounded("virDomainGetID", uri, dom.ID),
                                   None, spec.box_dir)
            stop_writer(spec.box_dir)
            libvirt_remote.start_bridge(spec.box_dir, uri, uuid, spec.agent.port_name,
                                        spec.agent.socket, console)
            start_writer(spec.box_dir, console, spec.console_log, spec.console_log_max_bytes)
            bounded("virDomainResume", uri, dom.resume)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                bounded("virDomainDestroy", uri, dom.destroy)
            libvirt_remote.stop_bridge(spec.box_dir)
            stop_writer(spec.box_dir)
            if isinstance(exc, libvirt.libvirtError):
                raise EngineError(f"libvirt domain {name} at {uri} could not be started "
                                  f"({exc}); it was destroyed") from exc
            raise
        _write_vm_file(spec.box_dir, handle)
        return handle

    def attach(self, box_dir: Path) -> LibvirtHandle | None:
        try:
            info = json.loads((Path(box_dir) / VM_FILE).read_text())
        except (OSError, ValueError):
            return None
        if info.get("backend") != self.name:
            return None
        if info.get("uuid") is None:  # launch() was cut short right after createXML
            found = _adopt_by_name(info["uri"], info["name"], Path(box_dir))
            if found is None:
                return None
            _write_vm_file(box_dir, found)
            return found
        handle = LibvirtHandle(info["uri"], info["name"], info["uuid"], int(info["id"]),
                               info.get("pid"), Path(box_dir))
        if not handle.is_running():
            handle.release()
            return None
        if not is_local(handle.uri) and libvirt_remote.ensure_bridge(Path(box_dir)):
            ensure_writer(Path(box_dir))  # its console source came back with the bridge
        return handle

    @property
    def remote_host(self) -> str:
        """The daemon's URI when it is on another machine, else ""."""
        return "" if is_local(self.uri) else self.uri

    def for_host(self, host: str) -> LibvirtBackend:
        """This backend on the libvirtd at URI ``host`` (``qemu+ssh://user@host/system``,
        ``qemu+tls://host/system``, ``qemu+tcp://...``; see libvirt's remote URIs).

        Raises:
            ConfigError: ``host`` is not a libvirt URI.
        """
        parts = urlsplit(host)
        if not parts.scheme or "://" not in host:
            raise ConfigError(f"--host {host!r}: the libvirt backend takes a libvirt URI, "
                              "e.g. qemu+ssh://user@host/system or qemu+tls://host/system")
        return LibvirtBackend(host, arch=self.arch, virtiofsd=self.virtiofsd)

    def prune(self) -> list[str]:
        """A remote daemon's content volumes nothing uses there (see libvirt_remote.prune);
        nothing for a local daemon (the files are in our home's caches).

        Raises:
            EngineError: the daemon cannot be reached, or refuses (LibvirtTimeout: stalls).
        """
        if is_local(self.uri):
            return []
        conn = open_connection(self.uri)
        try:
            return libvirt_remote.prune(conn, self.uri)
        finally:
            close_connection(self.uri, conn)

    def forget(self, box_dir: Path) -> None:
        """Delete the box's volumes from a remote daemon's pool (``box-<id>-*``); nothing for
        a local daemon (the box's disks are in its directory).

        Raises:
            EngineError: the daemon cannot be reached, or refuses (LibvirtTimeout: stalls).
        """
        try:
            info = json.loads((Path(box_dir) / VM_FILE).read_text())
        except (OSError, ValueError):
            return  # never launched here
        uri = str(info.get("uri") or "")
        if info.get("backend") != self.name or not uri or is_local(uri):
            return
        box_id = Path(box_dir).name
        conn = open_connection(uri)
        try:
            # the pool its launch used: this process's BOXLITE_LIBVIRT_POOL may differ
            libvirt_remote.forget(conn, uri, box_id,
                                  libvirt_remote.recorded_pool(Path(box_dir)))
        finally:
            close_connection(uri, conn)


def _destroy_late_domain(dom: libvirt.virDomain, conn: libvirt.virConnect) -> None:
    """The domain of a createXML we stopped waiting for: nobody tracks it, so it goes."""
    with contextlib.suppress(Exception):
        dom.destroy()
    with contextlib.suppress(Exception):
        conn.close()


def _restore_domain(conn: libvirt.virConnect, uri: str, name: str, image: Path,
                    plan: LaunchPlan) -> libvirt.virDomain:
    """The new box's domain, restored from the save image ``image`` under its own name and a
    new UUID: ``virDomainRestoreFlags`` of a private, renamed copy (``BOXDIR/restore.save``,
    removed once libvirt has read it) with the plan's XML. libvirt checks the XML against the
    saved one (same devices, addresses, machine, CPU, memory); only files and sockets differ.

    Raises:
        EngineError: the image is not a usable save image, or cannot be copied.
        libvirt.libvirtError: libvirt refused the restore (the caller names the domain).
        LibvirtTimeout: libvirt did not answer; a domain that appears later is destroyed.
    """
    uuid = str(uuidlib.uuid4())
    private = plan.spec.box_dir / PRIVATE_IMAGE
    _private_image(image, private, name, uuid)
    libvirt = import_libvirt()
    try:
        bounded("virDomainRestoreFlags", uri, conn.restoreFlags, str(private),
                with_uuid(str(plan.data["xml"]), uuid), libvirt.VIR_DOMAIN_SAVE_RUNNING,
                on_abandoned=lambda _r: _destroy_late_uuid(uri, uuid))
    finally:
        private.unlink(missing_ok=True)
    try:
        return bounded("virDomainLookupByUUIDString", uri, conn.lookupByUUIDString, uuid)
    except BaseException:
        # it runs, but we cannot track it: it must not stay
        with contextlib.suppress(Exception):
            bounded("virDomainDestroy", uri, _destroy_late_uuid, uri, uuid)
        raise


def _destroy_late_uuid(uri: str, uuid: str) -> None:
    """The domain of a restore we stopped waiting for: nobody tracks it, so it goes."""
    with contextlib.suppress(Exception):
        libvirt = import_libvirt()
        conn = libvirt.open(uri)
        try:
            conn.lookupByUUIDString(uuid).destroy()
        finally:
            conn.close()


def _check_switches(name: str, disks: dict[str, Path], switches: Sequence[DiskSwitch]) -> None:
    """Refuse, before anything is saved, a switch this domain cannot carry out."""
    for switch in switches:
        current = disks.get(switch.serial)
        if current is None:
            raise ConfigError(
                f"disk switch for serial {switch.serial!r}: libvirt domain {name} has no such "
                f"disk (its disks with serials: {sorted(disks) or 'none'})")
        if os.path.abspath(current) != os.path.abspath(switch.path):
            raise ConfigError(
                f"disk switch for serial {switch.serial!r}: libvirt domain {name} writes "
                f"{current}, not {switch.path}")
        if not switch.overlay.is_file():
            raise ConfigError(f"disk switch for serial {switch.serial!r}: the overlay "
                              f"{switch.overlay} does not exist; create it before the save")


def _switch_disks(switches: Sequence[DiskSwitch]) -> str:
    """Rename each overlay onto its disk (no QEMU holds them now); "" or what failed."""
    failed = []
    for switch in switches:
        try:
            os.replace(switch.overlay, switch.path)
        except OSError as exc:
            failed.append(f"disk {switch.serial!r}: renaming {switch.overlay} to {switch.path} "
                          f"failed ({exc}); the box still writes the frozen file")
    return "; ".join(failed)


def _save_error(name: str, exc: Exception) -> ConfigError | EngineError:
    """A refused save: QEMU's migration blockers are the VM's configuration, not a failure."""
    text = str(exc)
    if any(marker in text.lower() for marker in _BLOCKER_MARKERS):
        return UnsupportedError(
            f"libvirt domain {name}: QEMU cannot save this VM's state now: {text} (a 9p share "
            "cannot be saved while the guest has it mounted; virtiofs never)")
    return EngineError(f"libvirt domain {name}: virDomainSaveFlags failed: {text}")


def _writer_record(box_dir: Path | None) -> _ConsoleWriter | None:
    """The box's console writer, to start it again after a restore; None when the box has
    none (a remote daemon's), it writes a fifo, or its record is unreadable."""
    if box_dir is None:
        return None
    try:
        record: JsonObject = json.loads((Path(box_dir) / WRITER_STATE).read_text())
        if record.get("fifo"):
            return None
        return _ConsoleWriter(Path(str(record["socket"])), Path(str(record["out"])),
                              int(str(record["max_bytes"])),
                              int(str(record.get("backups", BACKUPS))))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _private_image(source: Path, target: Path, name: str, uuid: str) -> None:
    """``target`` (0600): ``source``, a libvirt save image, whose embedded domain is
    ``name``/``uuid``. The stream is copied in the kernel (``copy_file_range``: a reflink
    where the filesystem has them; ~50 ms for 117 MiB in the page cache here).

    Raises:
        EngineError: ``source`` is missing, unreadable or not a libvirt save image (named,
            with what is wrong), or ``target`` cannot be written. ``target`` is removed.
    """
    try:
        with open(source, "rb") as src:
            head = src.read(SAVE_HEADER.size)
            total = save_data_length(head)
            head += src.read(total - len(head))
            new_head = rebrand_save_header(head, name, uuid)
            size = os.fstat(src.fileno()).st_size
            if size <= total:
                raise SaveImageError("it ends after libvirt's header: no QEMU state follows")
            target.unlink(missing_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as dst:
                dst.write(new_head)
                dst.flush()
                _copy_range(src.fileno(), dst.fileno(), total, size)
    except SaveImageError as exc:
        target.unlink(missing_ok=True)
        raise EngineError(
            f"saved state {source} is not a usable libvirt save image: {exc}; save the "
            "state again (a boot template is made again by the next cold start)") from None
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise EngineError(f"could not copy the saved state {source} to {target}: {exc}"
                          ) from exc


def _copy_range(src: int, dst: int, offset: int, end: int) -> None:
    """Bytes [offset, end) of ``src`` to the same offsets of ``dst``."""
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(end - offset, 1 << 20), offset), offset)
        if n <= 0:
            raise OSError(errno.EIO, f"copy stopped at byte {offset} of {end}")
        offset += n


def _host_cpu() -> str:
    """The host CPU a host-passthrough guest sees: model name and a digest of its flags
    (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return f"{fields.get('model name') or fields.get('CPU part') or '?'} flags:{digest}"


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _adopt_by_name(uri: str, name: str, box_dir: Path) -> LibvirtHandle | None:
    """The running domain ``name`` (``boxlite-<box id>``: one box's alone), or None."""
    libvirt = import_libvirt()
    conn = open_connection(uri)
    try:
        try:
            dom = bounded("virDomainLookupByName", uri, conn.lookupByName, name)
        except libvirt.libvirtError:
            return None
        if not bounded("virDomainIsActive", uri, dom.isActive):
            return None
        return LibvirtHandle(uri, name, bounded("virDomainGetUUIDString", uri, dom.UUIDString),
                             bounded("virDomainGetID", uri, dom.ID), _read_pid(uri, name),
                             box_dir)
    finally:
        close_connection(uri, conn)


def _write_vm_file(box_dir: Path, handle: LibvirtHandle) -> None:
    _write_vm_record(box_dir, handle.to_dict())


def _write_vm_record(box_dir: Path, record: JsonObject) -> None:
    write_state(Path(box_dir) / VM_FILE, record)
