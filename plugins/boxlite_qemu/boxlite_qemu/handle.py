"""A running QEMU: identity (pid + start time), QMP control, and why it went away.

The handle holds no open connection: every QMP command connects afresh (see qmp.py), so
any process that can read BOXDIR/vm.json can drive the VM, and dropping a handle leaks nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from boxlite_core.errors import EngineError
from boxlite_core.vmm.base import VmHandle
from boxlite_core.vmm.consolelog import neutralise, stop_writer, tail_bytes, wait_writer
from boxlite_core.vmm.procstat import alive, log_tail, reap

from .qmp import QmpError, qmp_command

_PANIC_MARKERS = ("Kernel panic", "end Kernel panic")

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
    ) -> None:
        self.box_dir = Path(box_dir)
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

    def qmp(self, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Run one QMP command on this VM (e.g. ``query-status``)."""
        if not self.is_running():
            raise EngineError(f"QEMU (pid {self._pid}) is not running: {self.exit_reason()}")
        return qmp_command(self.qmp_socket, command, args, timeout)

    def status(self) -> str:
        """QEMU's run state ("running", "paused", ...)."""
        return str(self.qmp("query-status")["status"])

    def pause(self) -> None:
        """QMP ``stop``: the vCPUs halt; QEMU, its devices and the agent socket stay.

        Raises:
            EngineError: QEMU is not running, or QMP failed or timed out (QmpError).
        """
        self.qmp("stop")

    def resume(self) -> None:
        """QMP ``cont`` (harmless on a running VM). Raises as :meth:`pause`."""
        self.qmp("cont")

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
        )


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Atomic write (tmp + rename): an attach never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
