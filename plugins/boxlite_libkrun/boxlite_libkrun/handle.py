"""The running libkrun VM as the runtime sees it: one launcher process, found by pid + start time.

There is no monitor socket (libkrun has no QMP): the process *is* the VM. Stop is SIGTERM then
SIGKILL, and why it ended comes from the exit status and the launcher's log. The box's console
log writer (started before the launcher) is waited for and ended with it.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from boxlite_core.vmm.consolelog import stop_writer, wait_writer
from boxlite_core.vmm.process import ProcessVmHandle
from boxlite_core.vmm.procstat import start_time

from .launcher import ERROR_PREFIX

STATE_FILE = "vm.json"
LOG_FILE = "libkrun.log"


def write_state(box_dir: Path, pid: int, log: Path) -> dict[str, Any]:
    """Record what attach() needs: pid, its start time (the fingerprint), the log path."""
    state = {
        "backend": "libkrun",
        "pid": pid,
        "start_time": start_time(pid),
        "log": str(log),
    }
    tmp = box_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(box_dir / STATE_FILE)
    return state


def read_state(box_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((box_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def launcher_error(log: Path) -> str | None:
    """The launcher's last ``boxlite-libkrun:`` message in the log, if it wrote one."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln[len(ERROR_PREFIX) :] for ln in text.splitlines() if ln.startswith(ERROR_PREFIX)]
    return lines[-1] if lines else None


class LibkrunHandle(ProcessVmHandle):
    """A launcher process: our child (``proc``) or adopted from vm.json (``proc`` is None).

    Stop is the base's SIGTERM then SIGKILL: libkrun has no powerdown request of its own (the
    runtime asks the guest agent to shut down before it calls stop)."""

    def __init__(
        self,
        pid: int,
        start_time: int | None,
        log: Path,
        proc: subprocess.Popen[bytes] | None = None,
        box_dir: Path | None = None,
    ) -> None:
        super().__init__(pid, start_time, proc)
        self._log = log
        #: where the box's console log writer is recorded (logwriter.json)
        self.box_dir = Path(box_dir) if box_dir is not None else Path(log).parent

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
        wait_writer(self.box_dir, 1.0)  # it copies the launcher's last stderr lines
        parts = []
        rc = self.returncode()
        if rc is not None:
            if rc < 0:
                parts.append(f"killed by signal {-rc} ({signal.Signals(-rc).name})")
            else:
                parts.append(f"launcher exited with code {rc}")
        elif self._signalled is not None:
            parts.append(f"stopped by signal {self._signalled}")
        else:
            parts.append("the libkrun process is gone")
        error = launcher_error(self._log)
        if error:
            parts.append(error)
        return ": ".join(parts)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._finish_console()

    def kill(self) -> None:
        super().kill()
        self._finish_console()

    def release(self) -> None:
        """The agent socket belongs to libkrun inside the launcher; once the launcher has
        exited, its console log writer is ended too."""
        self._finish_console()

    def _finish_console(self) -> None:
        """The launcher is gone: let its console writer drain the last bytes and exit (it
        does so by itself when the pipes close), then make sure it has — by pid + start
        time, so a recycled pid is never signalled."""
        if self.is_running():
            return
        wait_writer(self.box_dir, 2.0)
        stop_writer(self.box_dir)
