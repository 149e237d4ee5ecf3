"""BoxLink: this process's hold on one box — its record, its lock, the VM handle and agent.

Why a class of its own: the lifecycle transitions (lifecycle.py), exec and copy
(boxexec.py) and the user-facing Box (box.py) all need the same live state, and none of them
should need each other. A link knows the box's record and the runtime's services; it never
knows the Runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..errors import EngineError, GuestError, NotFoundError, StateError
from ..models import BoxStatus
from ..vmm.base import VmHandle
from ..vmm.spec import AGENT_VSOCK_PORT, Handshake
from .cleanup import kill_vmm, leftover_processes, stop_helpers, stop_leftovers
from .pipeline import boot_timeout, console_tail
from .records import BoxRecord
from .services import Services

if TYPE_CHECKING:  # imported when first used: gRPC is slow to import
    from ..channel.client import AgentClient

log = logging.getLogger(__name__)

#: seconds a re-attach waits for the agent of an already running VM
ATTACH_TIMEOUT = 30.0


def is_clean_exit(reason: str | None) -> bool:
    """Did the VM power off by itself (guest shutdown) rather than crash or get killed?"""
    if not reason:
        return False
    text = reason.lower()
    if "signal" in text or "killed" in text or "crash" in text or "panic" in text:
        return False
    return any(
        word in text
        for word in ("exit code 0", "exited with 0", "status 0", "powered off", "shutdown",
                     "exited normally", "code 0")
    )


def gone_unwatched(record: BoxRecord) -> str:
    """How a VM that no handle can account for ended, as far as anyone here can know: a
    process that is not our child leaves no exit status to read (it went to its parent)."""
    vmm = record.vmm or {}
    pid = record.pid or vmm.get("pid")
    if pid:
        return (f"VM process {pid} exited or was killed (not our child: its exit status is "
                "unknown; `boxlite logs` shows the guest's last words)")
    return "the VM is gone (the backend could not say how it ended)"


def paused_error(name: str, doing: str) -> StateError:
    """What any request that needs the guest's vCPUs gets while the box is paused."""
    return StateError(
        f"box {name} is paused: {doing} needs it running; resume it first "
        f"(`boxlite resume {name}`)"
    )


class BoxLink:
    """The live state one process holds for one box. Thread-safe through ``lock``."""

    def __init__(self, services: Services, record: BoxRecord) -> None:
        self.services = services
        self.id = record.id
        self.name = record.name
        self.record = record
        #: serialises this process's threads; ``exclusive`` adds the cross-process flock
        self.lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fh: IO[str] | None = None
        self.handle: VmHandle | None = None
        self.client: AgentClient | None = None
        self.sharer_name: str | None = None

    @property
    def dir(self) -> Path:
        return self.services.box_dir(self.id)

    def refresh(self) -> BoxRecord:
        """Re-read the record (NotFoundError once the box is removed)."""
        self.record = self.services.store.get(self.id)
        return self.record

    # -- the per-box lock -------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise start/stop/remove of this box across threads and processes (flock)."""
        with self.lock:
            if self._lock_depth == 0:
                fh = self.services.lock_path(self.id).open("a")
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._lock_fh = fh
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fh is not None:
                    self._lock_fh.close()
                    self._lock_fh = None

    def lock_busy(self) -> bool:
        """Does another stop/start/remove hold this box's lock (any thread or process)?"""
        try:
            fd = os.open(self.services.lock_path(self.id), os.O_RDONLY)
        except FileNotFoundError:
            return False  # removed (remove unlinks it) or never locked
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock too
        return False

    # -- VM handle and agent ----------------------------------------------------------------

    def attach_handle(self) -> VmHandle | None:
        """The backend's handle on this box's VM, or None (no backend, none running, or the
        backend's attach failed for another reason than the one below: logged).

        Raises:
            GuestError: the backend cannot tell whether the VM runs (its daemon, maybe on
                another machine, is unreachable: an EngineError from ``attach``). Nothing is
                settled: the record stays as it was, for when the daemon is back.
        """
        record = self.record
        if not record.backend:
            return None
        try:
            backend = self.services.plugins.backend(record.backend, record.options.host)
            return backend.attach(self.dir)
        except EngineError as exc:
            raise GuestError(
                f"box {self.name}: cannot tell whether its VM runs ({exc}); nothing was "
                f"changed: it is still recorded as {record.status.value}") from exc
        except Exception as exc:
            log.warning("box %s: attach failed: %s", self.name, exc)
            return None

    def connect(self, handle: VmHandle, timeout: float) -> AgentClient:
        """A fresh agent connection to the running VM behind ``handle`` (timeout: seconds)."""
        from ..channel.client import AgentClient

        agent = dict(self.record.state.get("agent") or {})
        kind = agent.get("kind") or "virtio-serial"
        box_dir = self.dir
        return AgentClient.connect(
            box_dir,
            kind=str(kind),
            socket_path=Path(str(agent["socket"])) if agent.get("socket") else None,
            # a box started by another process keeps its channel's handshake (Firecracker
            # hybrid vsock): the record holds the spec's AgentChannel as a dict
            handshake=str(agent.get("handshake") or Handshake.NONE),
            vsock_port=int(agent.get("vsock_port") or AGENT_VSOCK_PORT),
            timeout=timeout,
            is_alive=handle.is_running,
            console_tail=lambda: console_tail(box_dir),
        )

    def live_client(self) -> AgentClient:
        """The agent connection of a Running box, attaching to it if another process started
        it.

        Raises StateError (not running; paused: names `boxlite resume`), GuestError (the VM
        is gone: the record is settled first)."""
        with self.lock:
            record = self.refresh()
            if record.status is BoxStatus.PAUSED:
                raise paused_error(self.name, "a command")
            if record.status is not BoxStatus.RUNNING:
                hint = f"start it first (`boxlite start {self.name}`)"
                if record.status is BoxStatus.FAILED and record.error:
                    hint = f"it failed: {record.error}; {hint}"
                raise StateError(f"box {self.name} is {record.status.value}; {hint}")
            if self.client is not None and self.handle is not None:
                return self.client
            handle = self.handle or self.attach_handle()
            if handle is None or not handle.is_running():
                self.handle = handle
                raise self.vm_gone("while detached")
            self.handle = handle
            sharer = record.state.get("sharer")
            self.sharer_name = sharer if isinstance(sharer, str) else None
            try:
                self.client = self.connect(handle, timeout=min(ATTACH_TIMEOUT, boot_timeout()))
            except Exception as exc:
                if not handle.is_running():
                    raise self.vm_gone("while attaching") from exc
                raise
            return self.client

    def vm_gone(self, during: str) -> GuestError:
        """Settle the record of a VM that died and build the error the caller sees: the
        backend's account of how it died (its handle's ``exit_reason``), then the guest
        console's last lines."""
        handle = self.handle
        reason = None
        if handle is not None:
            with contextlib.suppress(Exception):
                reason = handle.exit_reason()
        reason = reason or gone_unwatched(self.record)
        tail = console_tail(self.dir, lines=10)
        clean = is_clean_exit(reason)
        self.teardown_host_side()
        self.settle(
            BoxStatus.STOPPED if clean else BoxStatus.FAILED,
            f"VM stopped {during}: {reason}",
        )
        message = f"box {self.name}: VM stopped {during} ({reason})"
        if tail:
            message += f"\n--- guest console (last lines) ---\n{tail}"
        return GuestError(message)

    def detach(self) -> None:
        """Forget the live connection in this process; the VM keeps running. Cheap, and no
        longer needed for other processes to reach the box: the per-box agent shim serves any
        number of them, and closing this client leaves the shim running."""
        with self.lock:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            if self.handle is not None:
                with contextlib.suppress(Exception):
                    self.handle.release()
            self.client = None
            self.handle = None

    def teardown_host_side(self) -> None:
        """Close the agent, release the handle, stop the agent shim and sharer helpers (from
        any process), then any session leader still naming the box directory."""
        self.detach()
        stop_helpers(self.services, self.record, self.dir, self.sharer_name)
        self.sharer_name = None
        with contextlib.suppress(Exception):
            stop_leftovers(leftover_processes(self.dir))

    def kill_vm(self) -> None:
        """Kill the VM by every name the box has for it (handle, backend state file, the
        VMM identity in the record, the plan's pidfile)."""
        kill_vmm(self.services, self.record, self.dir, self.handle)

    # -- record -----------------------------------------------------------------------------

    def settle(self, status: BoxStatus, reason: str, error: str | None = None) -> None:
        """Record a stop/failure; tolerate another process having recorded it first."""
        services = self.services
        failed = status is BoxStatus.FAILED
        message = (error or reason) if failed else None
        try:
            if failed:
                record = services.store.set_status(
                    self.id, status, state={"stop_reason": reason}, pid=None,
                    stopped_at=time.time(), error=message, failures=self.record.failures + 1,
                )
            else:
                record = services.store.set_status(
                    self.id, status, state={"stop_reason": reason}, pid=None,
                    stopped_at=time.time(),
                )
        except StateError:
            self.refresh()
            return
        except NotFoundError:
            return
        self.record = record
        if failed:
            services.db.bump("boxes_failed")
            services.plugins.notify("failed", box=record.to_dict(), error=message, stage=None)
        else:
            services.db.bump("boxes_stopped")
            services.plugins.notify("stopped", box=record.to_dict(), reason=reason)

    def count(self, key: str) -> None:
        """Bump a counter in the home's metrics and in the box's own."""
        with contextlib.suppress(Exception):
            self.services.db.bump(key)
            self.services.store.bump_state_counter(self.id, key)


__all__ = ["ATTACH_TIMEOUT", "BoxLink", "gone_unwatched", "is_clean_exit", "paused_error"]
