"""The running libkrun VM as the runtime sees it: one launcher process, found by pid + start time.

There is no monitor socket (libkrun has no QMP): the process *is* the VM. Stop is SIGTERM then
SIGKILL, and why it ended comes from the exit status and the launcher's log.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

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
    ) -> None:
        super().__init__(pid, start_time, proc)
        self._log = log

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
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

    def release(self) -> None:
        """Nothing to drop: the agent socket belongs to libkrun inside the launcher."""
