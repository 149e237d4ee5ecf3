"""A running QEMU: identity (pid + start time), QMP control, and why it went away.

The handle holds no open connection: every QMP command connects afresh (see qmp.py), so
any process that can read BOXDIR/vm.json can drive the VM, and dropping a handle leaks nothing.

Saving state (``save_state``) is QEMU migration to a file: the VM is stopped, its disks are
switched to new overlays if asked, and QMP ``migrate`` writes memory and device state to an
fd we pass over the monitor socket (``exec:`` migration would need a spawn, which
``-sandbox spawn=deny`` forbids). ``backend.launch`` loads such a file the other way round
(``-incoming defer`` + ``migrate-incoming``); both wait in one QMP session (``qmp_poll``)
and read ``query-migrate`` with :func:`migration_finished`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boxlite_core.errors import ConfigError, EngineError, StateError, UnsupportedError
from boxlite_core.models import JsonObject, JsonValue
from boxlite_core.vmm.base import VmHandle
from boxlite_core.vmm.consolelog import neutralise, stop_writer, tail_bytes, wait_writer
from boxlite_core.vmm.procstat import alive, log_tail, reap
from boxlite_core.vmm.spec import DiskSwitch

from .argv import STATE_FILE, STATE_INFO, VM_STATE
from .qmp import (
    Poll,
    QmpError,
    QmpStep,
    QmpTimeout,
    bound,
    qmp_command,
    qmp_commands,
    qmp_poll,
)

log = logging.getLogger(__name__)

_PANIC_MARKERS = ("Kernel panic", "end Kernel panic")

#: the name our migration fd has inside QEMU's monitor (getfd / uri=fd:NAME)
MIGRATION_FD = "boxlite-migration"
#: the slowest stream rate a migration bound allows for, in bytes/s (measured here under
#: TCG, 512 MiB guest: 117 MiB in 0.2-0.3 s to a file, 0.2-0.5 s to load)
MIGRATION_MIN_RATE = 20 * 1000 * 1000
#: QEMU caps migration at 32 MiB/s by default; a file needs no throttle
MIGRATION_MAX_BANDWIDTH = 1 << 40
#: what QEMU's refusal to migrate says when a device blocks it (e.g. a mounted 9p export:
#: "Migration is disabled when VirtFS export path '...' is mounted in the guest using
#: mount_tag '...'")
_BLOCKER_MARKERS = ("migration is disabled", "blocked", "blocker", "non-migratable")
#: seconds a cancelled migration may take to stop (QEMU stops it at its next chunk: ms)
MIGRATION_CANCEL_BOUND = 5.0
#: query-migrate states in which no migration runs any more
_MIGRATION_OVER = ("none", "completed", "failed", "cancelled")


def json_object(value: JsonValue) -> JsonObject:
    """``value`` if it is a JSON object, else ``{}`` (a QMP answer of an unexpected shape)."""
    return value if isinstance(value, dict) else {}


def migration_bound(size_bytes: int) -> float:
    """Seconds a migration of ``size_bytes`` may take: 30 s + the size at 20 MB/s, raised by
    ``BOXLITE_QMP_TIMEOUT`` on a slow host."""
    return bound(30.0 + size_bytes / MIGRATION_MIN_RATE)


def migration_finished(what: str, answer: JsonValue) -> bool:
    """Whether a ``query-migrate`` answer says the migration completed.

    Raises:
        EngineError: it failed or was cancelled (QEMU's error-desc quoted, after ``what``).
    """
    info = json_object(answer)
    status = str(info.get("status", "none"))
    if status in ("failed", "cancelled"):
        raise EngineError(f"{what} {status}: {info.get('error-desc') or 'QEMU gave no reason'}")
    return status == "completed"


#: QEMU processes this process started, by pid: an attach() in the same process shares the
#: Popen, so exactly one waitpid collects the status and every handle can report it.
_LAUNCHED: dict[int, subprocess.Popen[bytes]] = {}


def _describe_wait_status(status: int, pid: int | None = None) -> str:
    if os.WIFSIGNALED(status):
        return _signal_text(os.WTERMSIG(status), pid)
    return f"{_qemu(pid)} exited with status {os.WEXITSTATUS(status)}"


def _qemu(pid: int | None) -> str:
    return f"QEMU (pid {pid})" if pid else "QEMU"


def _signal_text(signum: int, pid: int | None = None) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "?"
    return f"{_qemu(pid)} was killed by signal {signum} ({name})"


class QemuHandle(VmHandle):
    """Launched (``popen`` given: we are QEMU's parent and know its exit status) or
    attached (``popen`` None: another process started it; we know identity only)."""

    def __init__(
        self,
        box_dir: Path,
        pid: int,
        start_time: int | None,
        qmp_socket: Path,
        console_log: Path | None = None,
        log: Path | None = None,
        popen: subprocess.Popen[bytes] | None = None,
        drives: dict[str, str] | None = None,
        shares: dict[str, str] | None = None,
    ) -> None:
        self.box_dir = Path(box_dir)
        #: disk serial → QEMU drive id (argv.drive_ids), for save_state's disk switches
        self.drives = dict(drives or {})
        #: share tag → host directory, to name the share that blocks a save
        self.shares = dict(shares or {})
        self._pid = pid
        self._start_time = start_time
        self.qmp_socket = Path(qmp_socket)
        self.console_log = Path(console_log) if console_log else None
        self.log = Path(log) if log else None
        if popen is None and pid in _LAUNCHED and _LAUNCHED[pid].pid == pid:
            popen = _LAUNCHED[pid]
        elif popen is not None:
            _LAUNCHED[pid] = popen
        self._popen = popen
        self._wait_status: int | None = None
        self._host_action: str | None = None  # what *we* did to end it, for exit_reason

    # -- identity ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def start_time(self) -> int | None:
        return self._start_time

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status as subprocess spells it (-N: killed by signal N) once it has
        exited, when this process launched it; None while it runs or when not our child."""
        self._reap()
        if self._wait_status is None:
            return None
        return os.waitstatus_to_exitcode(self._wait_status)

    def _reap(self) -> None:
        if self._wait_status is not None:
            return
        if self._popen is not None:
            if self._popen.poll() is None and not alive(self._pid, None):
                # a zombie leader whose other threads are still exiting: waitpid answers
                # only once they are gone, which takes milliseconds
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(5.0)
            if self._popen.poll() is not None:
                _LAUNCHED.pop(self._pid, None)
                rc = self._popen.returncode
                # rebuild a wait status so one describer serves both paths
                self._wait_status = (-rc) & 0x7F if rc < 0 else (rc & 0xFF) << 8
            return
        status = reap(self._pid)  # attached but maybe still our child (same process)
        if status is not None:
            self._wait_status = status

    def is_running(self) -> bool:
        self._reap()
        if self._wait_status is not None:
            return False
        return alive(self._pid, self._start_time)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._popen is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(min(0.2, remaining) if remaining is not None else 0.2)
            else:
                time.sleep(0.05)
        return True

    # -- control ---------------------------------------------------------------------------

    def qmp(
        self, command: str, args: JsonObject | None = None, timeout: float = 5.0
    ) -> JsonValue:
        """Run one QMP command on this VM (e.g. ``query-status``); its result."""
        if not self.is_running():
            raise EngineError(f"QEMU (pid {self._pid}) is not running: {self.exit_reason()}")
        return qmp_command(self.qmp_socket, command, args, timeout)

    def status(self) -> str:
        """QEMU's run state ("running", "paused", ...)."""
        return str(json_object(self.qmp("query-status"))["status"])

    def pause(self) -> None:
        """QMP ``stop``: the vCPUs halt; QEMU, its devices and the agent socket stay.

        Raises:
            EngineError: QEMU is not running, or QMP failed or timed out (QmpError).
        """
        self.qmp("stop")

    def resume(self) -> None:
        """QMP ``cont`` (harmless on a running VM). Raises as :meth:`pause`."""
        self.qmp("cont")

    # -- state ---------------------------------------------------------------------------

    def save_state(
        self,
        directory: Path,
        *,
        switch_disks: Sequence[DiskSwitch] = (),
        resume: bool = True,
        restores_share_memory: bool = False,
    ) -> None:
        """QMP ``stop``; switch each disk (``blockdev-snapshot-sync`` onto the existing
        ``overlay``, then ``overlay`` renamed to ``path``); migrate to ``directory/``
        ``qemu-vmstate`` (0600, fsynced); ``qemu-state.json`` beside it; then ``cont`` if
        ``resume`` and the VM was running. The disks are switched before the migration
        because a completed migration leaves them inactive until ``cont``.

        Files written: ``qemu-vmstate`` (the stream; a 512 MiB guest: ~117 MiB, saved in
        0.2-0.3 s under TCG) and ``qemu-state.json`` (``{"state_file", "qemu_version",
        "memory_bytes", "stream_bytes", "save_seconds", "migration_ms"}``).

        A guest whose agent port has a host attached (the shim) is saved mid-connection: a
        VM restored from it learns that its host is gone only once it runs, and a host that
        connects at that instant can miss the agent's READY. Detach the host first (stop
        the shim) when the restored VM's first host must get READY at once (templates).

        With ``restores_share_memory`` (a boot template), once the VM runs again the stream
        becomes a memory image (memimage.materialize: ``qemu-ram``, the guest RAM restores
        map copy-on-write, and ``qemu-devstate``, ~0.2 MiB; the stream is removed;
        ``qemu-state.json`` gains ``"memory_image"``). If that fails the stream stays and
        serves restores as before (a warning is logged): the save itself succeeded.

        A VM an earlier ``save_state(resume=False)`` left paused ("postmigrate": QEMU
        refuses to migrate it again, its disks are inactive) runs for the moment of one
        ``cont`` + ``stop`` (a few ms) first, then is saved and stays paused.

        Raises:
            StateError: QEMU is not running, or waits for an incoming state.
            ConfigError: a switch names a disk serial this VM does not have.
            UnsupportedError: QEMU refuses to migrate this VM (a migration blocker, e.g. a
                9p share mounted in the guest), with QEMU's reason.
            EngineError: QMP failed, a disk switch or the migration failed or timed out
                (QmpTimeout), or the state file could not be written. Switches already made
                stay made; a migration still running is cancelled and the partial
                ``qemu-vmstate`` removed (also on Ctrl-C), and the VM is resumed (best effort)
                if ``resume`` and it was running, so a later save can succeed.
        """
        directory = Path(directory)
        if not self.is_running():
            raise StateError(
                f"cannot save the state of QEMU (pid {self._pid}): it is not running "
                f"({self.exit_reason()})"
            )
        for switch in switch_disks:
            if switch.serial not in self.drives:
                raise ConfigError(
                    f"disk switch for serial {switch.serial!r}: this VM has no such disk "
                    f"(its disks with serials: {sorted(self.drives) or 'none recorded'})"
                )
        started = time.monotonic()
        status = self.status()
        if status == "inmigrate":
            raise StateError(
                f"cannot save the state of QEMU (pid {self._pid}) now: it waits for an "
                "incoming state (a restore that has not finished)"
            )
        was_running = status == "running"
        if status == "postmigrate":
            # reactivate the disks an earlier save left inactive; the guest runs for the
            # two commands' round trip
            qmp_commands(self.qmp_socket, [("cont", None), ("stop", None)])
        self.qmp("stop")
        resumes = resume and was_running
        try:
            for switch in switch_disks:
                self._switch_disk(switch)
            info, version, memory = self._migrate_to(directory / STATE_FILE, resumes)
            facts: dict[str, Any] = {
                "state_file": STATE_FILE,
                "qemu_version": json_object(version.get("qemu")) | {
                    "package": version.get("package")},
                "memory_bytes": memory.get("base-memory"),
                "stream_bytes": (directory / STATE_FILE).stat().st_size,
                "save_seconds": round(time.monotonic() - started, 3),
                "migration_ms": info.get("total-time"),
            }
        except BaseException:
            if resumes:
                with contextlib.suppress(EngineError):
                    if self.status() != "running":
                        self.qmp("cont")
            raise
        if restores_share_memory:
            image = self._memory_image(directory, int(facts["memory_bytes"] or 0))
            if image is not None:
                facts["memory_image"] = image
        write_state(directory / STATE_INFO, facts)

    def _memory_image(self, directory: Path, memory_bytes: int) -> JsonObject | None:
        """The saved stream in ``directory`` made a memory image (memimage.materialize), the
        stream then removed; None (the stream kept, a warning logged) when it cannot be."""
        from .memimage import materialize, usable  # memimage uses this module's helpers

        why_not = usable()
        if why_not is not None:
            log.info("no memory image for %s: %s", directory, why_not)
            return None
        try:
            launched = json.loads((self.box_dir / VM_STATE).read_text())
            argv = [str(a) for a in launched["argv"]]
            machine = str(launched["machine"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("no memory image for %s: its launch record is unreadable (%s)",
                        directory, exc)
            return None
        try:
            image = materialize(directory, directory / STATE_FILE, argv, machine=machine,
                                memory_bytes=memory_bytes)
        except EngineError as exc:
            log.warning("no memory image for %s; restores load the stream: %s",
                        directory, exc)
            return None
        (directory / STATE_FILE).unlink()
        return image

    def _switch_disk(self, switch: DiskSwitch) -> None:
        """Make the drive of ``switch.serial`` write ``switch.overlay`` (its backing: the node
        it wrote so far), then rename the overlay to ``switch.path``.

        QEMU re-opens a node's file by its name whenever it changes the access mode (a node
        opens read-only first and read-write once the disk writes; a migration's
        inactivation and ``cont`` switch again), and the overlay's name is gone after the
        rename: the migration then failed with "bdrv_inactivate_all() failed (-1)"
        (measured). So QEMU gets a name that survives renames: it keeps an fd of the overlay
        (``getfd``) and opens it as ``/proc/self/fd/N``, which reaches the same inode
        whatever it is called. (An ``add-fd`` fd set does not do: QEMU closes an unused set
        when a monitor client leaves, and dups of one fd share their locks.)

        QEMU keeps that fd (named ``boxlite-overlay-<serial>-<ns>`` in its monitor) for the
        VM's life, on purpose: every later re-open goes through ``/proc/self/fd/N``, so
        closing it (``closefd``) would break the next access-mode switch. So each snapshot
        or fork of this VM leaves one more fd open in QEMU (one per switched disk); they go
        when QEMU exits. Only a failed switch closes its fd at once.
        """
        drive = self.drives[switch.serial]
        what = (f"switching disk {switch.serial!r} (drive {drive}) of QEMU (pid {self._pid}) "
                f"to the overlay {switch.overlay}")
        try:
            fd = os.open(switch.overlay, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise EngineError(f"{what}: cannot open it ({exc})") from exc
        name = f"boxlite-overlay-{switch.serial}-{time.time_ns()}"
        try:
            qmp_commands(self.qmp_socket, [("getfd", {"fdname": name})], fds={0: fd})
            held = self._qemu_fd_of(os.fstat(fd))
            try:
                self.qmp("blockdev-snapshot-sync", {
                    "device": drive,
                    "snapshot-file": f"/proc/self/fd/{held}",
                    "format": "qcow2",
                    "mode": "existing",
                }, timeout=30.0)
            except QmpError:
                with contextlib.suppress(EngineError):
                    qmp_command(self.qmp_socket, "closefd", {"fdname": name})
                raise
        except QmpError as exc:
            raise EngineError(f"{what} failed: {exc}") from exc
        finally:
            os.close(fd)
        try:
            os.replace(switch.overlay, switch.path)
        except OSError as exc:
            raise EngineError(
                f"disk {switch.serial!r} of QEMU (pid {self._pid}) now writes {switch.overlay}, "
                f"but renaming it to {switch.path} failed: {exc}"
            ) from exc

    def _qemu_fd_of(self, st: os.stat_result) -> int:
        """The number of QEMU's fd on the file ``st`` describes (the one ``getfd`` gave it)."""
        fd_dir = Path(f"/proc/{self._pid}/fd")
        try:
            for entry in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = entry.stat()
                    if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                        return int(entry.name)
        except OSError as exc:
            raise EngineError(f"cannot list QEMU's fds in {fd_dir}: {exc}") from exc
        raise EngineError(f"QEMU (pid {self._pid}) took no fd of the overlay ({fd_dir})")

    def _migrate_to(
        self, state: Path, resume: bool
    ) -> tuple[JsonObject, JsonObject, JsonObject]:
        """Migrate the (stopped) VM into the new file ``state`` and, if ``resume``, ``cont``
        it once the stream is complete (the fsync follows: the VM need not wait for the
        disk). QEMU's last query-migrate, its query-version and query-memory-size-summary.

        One QMP session from ``migrate`` to ``cont``, polled every 10 ms: a connection per
        query (thread, event loop, greeting, capabilities) every 20 ms cost a save up to
        ~25 ms and a fork as much.

        On any failure once ``migrate`` may have been sent (a timeout, Ctrl-C, an error while
        waiting) the migration is cancelled first (:meth:`_cancel_migration`): left alone it
        would go on, complete and leave QEMU in "postmigrate" (vCPUs stopped for good, disks
        inactive) behind the caller's back, and the next save would find it still running.
        The partial ``state`` is removed.
        """
        memory = json_object(self.qmp("query-memory-size-summary")).get("base-memory") or 0
        what = f"saving the state of QEMU (pid {self._pid}) to {state}"
        try:
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EngineError(f"cannot create the VM state file {state}: {exc}") from exc
        then: tuple[QmpStep, ...] = (("query-version", None), ("query-memory-size-summary", None))
        poll = Poll("query-migrate", functools.partial(migration_finished, what),
                    migration_bound(int(memory)), f"{what} (QMP query-migrate on "
                    f"{self.qmp_socket})", interval=0.01,
                    then=then + ((("cont", None),) if resume else ()))
        try:
            try:
                answers = qmp_poll(self.qmp_socket, [
                    ("migrate-set-parameters", {"max-bandwidth": MIGRATION_MAX_BANDWIDTH}),
                    ("getfd", {"fdname": MIGRATION_FD}),
                    ("migrate", {"uri": f"fd:{MIGRATION_FD}"}),
                ], poll, fds={1: fd}, timeout=10.0)
            except QmpTimeout:
                raise  # QEMU may have taken the migrate: the handler below cancels it
            except QmpError as exc:
                if any(m in str(exc).lower() for m in _BLOCKER_MARKERS):
                    raise UnsupportedError(
                        f"QEMU (pid {self._pid}) cannot save this VM's state now: {exc}"
                        + self._blocker_hint(str(exc))
                    ) from exc
                if not self.still_running(2.0):  # a monitor that failed: QEMU exiting?
                    raise self._gone_error() from None
                raise
            os.fsync(fd)
        except BaseException:
            self._cancel_migration()
            with contextlib.suppress(OSError):
                state.unlink()
            raise
        finally:
            os.close(fd)
        info, version, summary = (json_object(a) for a in answers[3:6])
        return info, version, summary

    def _cancel_migration(self) -> None:
        """Best effort, bounded (:data:`MIGRATION_CANCEL_BOUND` seconds of polling): QMP
        ``migrate_cancel``, wait until ``query-migrate`` says no migration runs (cancelled,
        failed, or completed after all), then ``closefd`` our migration fd if QEMU still holds
        it under its name (``migrate`` takes it; a migrate that never ran leaves it).

        Leaves the VM paused (or "postmigrate" if it completed): the caller's ``cont``
        makes it run either way. Never raises an EngineError: the caller is already failing
        with the error that matters; a QEMU that does not answer or has gone is left as is.
        """
        if not self.is_running():
            return
        with contextlib.suppress(EngineError):
            qmp_command(self.qmp_socket, "migrate_cancel", timeout=5.0)
        deadline = time.monotonic() + MIGRATION_CANCEL_BOUND
        while time.monotonic() < deadline and self.is_running():
            try:
                info = json_object(qmp_command(self.qmp_socket, "query-migrate", timeout=5.0))
            except EngineError:
                break
            if str(info.get("status", "none")) in _MIGRATION_OVER:
                break
            time.sleep(0.05)
        with contextlib.suppress(EngineError):
            qmp_command(self.qmp_socket, "closefd", {"fdname": MIGRATION_FD}, timeout=5.0)

    def _blocker_hint(self, message: str) -> str:
        tags = [tag for tag in self.shares if f"'{tag}'" in message]
        if not tags:
            return ""
        return (
            f" (share {tags[0]!r}, host directory {self.shares[tags[0]]}: a 9p share "
            "mounted in the guest blocks QEMU's migration; save before it is mounted, or "
            "use a box without it)"
        )

    def still_running(self, grace: float = 0.0) -> bool:
        """True if QEMU still runs after waiting up to ``grace`` seconds for it to exit (a
        monitor that stopped answering often means QEMU is on its way out)."""
        return not self.wait(grace) if grace > 0 else self.is_running()

    def _gone_error(self) -> EngineError:
        return EngineError(f"QEMU (pid {self._pid}) went away: {self.exit_reason()}")

    def _signal(self, signum: int) -> None:
        if not self.is_running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """ACPI powerdown (half the grace), then QMP quit (QEMU exits cleanly, flushing
        disks), then SIGTERM, then SIGKILL. microvm guests without an ACPI button driver
        ignore the powerdown; the quit step is what normally ends them."""
        if not self.is_running():
            return
        # a guest that honours ACPI powers off within a second or two; waiting longer only
        # delays the quit for guests that never will (microvm without a button driver)
        powerdown_grace = min(timeout / 2, 3.0)
        steps: list[tuple[str, float]] = [
            ("system_powerdown", powerdown_grace),
            ("quit", max(1.0, timeout - powerdown_grace)),
        ]
        for command, grace in steps:
            try:
                qmp_command(self.qmp_socket, command, timeout=min(5.0, max(1.0, grace)))
            except QmpError:
                if not self.is_running():
                    break
                continue
            if command == "quit":
                self._host_action = "stopped by boxlite (QMP quit)"
            if self.wait(grace):
                if self._host_action is None:
                    self._host_action = "guest powered off after ACPI powerdown"
                return
        if not self.is_running():
            return
        self._host_action = "stopped by boxlite (SIGTERM)"
        self._signal(signal.SIGTERM)
        if self.wait(3.0):
            return
        self.kill()

    def kill(self) -> None:
        if not self.is_running():
            return
        self._host_action = _signal_text(signal.SIGKILL, self._pid) + ", sent by boxlite"
        self._signal(signal.SIGKILL)
        self.wait(5.0)
        self._finish_console()

    def _finish_console(self) -> None:
        """QEMU is gone: let its console writer drain the last bytes and exit (it does so by
        itself on the socket's end), then make sure it has (pid + start time checked)."""
        if self.is_running():
            return
        wait_writer(self.box_dir, 2.0)
        stop_writer(self.box_dir)

    def release(self) -> None:
        """Nothing to drop: QMP connections are per command. Reap if QEMU already exited,
        and then end its console writer too."""
        self._reap()
        self._finish_console()

    # -- diagnosis ---------------------------------------------------------------------------

    def _panic_line(self) -> str | None:
        if self.console_log is None:
            return None
        for line in reversed(self.console_tail(60).splitlines()):
            if any(m in line for m in _PANIC_MARKERS):
                return line.strip()
        return None

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
        panic = self._panic_line()
        if self._wait_status is not None:
            text = _describe_wait_status(self._wait_status, self._pid)
            if os.WIFEXITED(self._wait_status) and os.WEXITSTATUS(self._wait_status) == 0:
                if panic:
                    return f"guest kernel panic ({panic}); {text}"
                if self._host_action:
                    return f"{self._host_action}; {text}"
                return f"guest powered off ({text})"
            if os.WIFSIGNALED(self._wait_status):
                return text + (", sent by boxlite" if self._host_action else "")
            log = log_tail(self.log, 5) if self.log else ""
            return text + (f": {log}" if log else "")
        if self._host_action:
            return self._host_action
        if panic:
            return f"guest kernel panic ({panic})"
        return (
            f"QEMU (pid {self._pid}) exited or was killed (not our child: its exit status "
            "went to the process that started it)"
        )

    def console_tail(self, lines: int = 20) -> str:
        """The guest console's last lines, across rotation, with control characters shown
        as text (error messages carry it to terminals; the guest wrote it)."""
        if not self.console_log:
            return ""
        if not self.is_running():
            wait_writer(self.box_dir, 1.0)  # it writes a dead VM's last bytes, then exits
        return neutralise(tail_bytes(self.console_log, lines, 64 * 1024)).rstrip()

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "pid": self._pid,
            "start_time": self._start_time,
            "qmp_socket": str(self.qmp_socket),
            "console_log": str(self.console_log) if self.console_log else None,
            "log": str(self.log) if self.log else None,
            "drives": dict(self.drives),
            "shares": dict(self.shares),
        }

    @classmethod
    def from_state(cls, box_dir: Path, state: dict[str, Any]) -> QemuHandle:
        return cls(
            box_dir,
            int(state["pid"]),
            state.get("start_time"),
            Path(state["qmp_socket"]),
            Path(state["console_log"]) if state.get("console_log") else None,
            Path(state["log"]) if state.get("log") else None,
            drives=state.get("drives"),
            shares=state.get("shares"),
        )


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Atomic write (tmp + rename): an attach never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
