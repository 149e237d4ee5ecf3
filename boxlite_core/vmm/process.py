"""Host processes a box depends on (a VMM, a launcher, a file server), known by pid + start time.

Boxes outlive the process that started them: a later ``boxlite`` command re-adopts the VM from
the pid in its state file. A pid alone is not an identity (the kernel recycles them), so every
record also keeps the process's start time (field 22 of ``/proc/PID/stat``, clock ticks since
boot) and a process only counts as ours when both match. A zombie counts as gone: it has
exited, its parent just has not collected the status yet.

Backends whose VM *is* one host process build their handle on :class:`ProcessVmHandle`;
backends with a monitor (QEMU's QMP) use the functions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from .base import VmHandle


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (fields[0] is the state), None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if there is no such process.

    A zombie still has one, so a record written right after a quick death stays exact."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """``pid`` runs, is not a zombie, and (when ``started`` is known) is the same process."""
    if pid <= 0:
        return False
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def reap(pid: int) -> int | None:
    """Collect ``pid``'s exit status if it is our exited child (raw wait status), else None.
    Never blocks; harmless for a pid that is not our child."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None


def log_tail(path: Path | str, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log (reading at most its last ``max_bytes``): what error
    messages quote so a failure explains itself. Empty when the log is missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip().splitlines()[-lines:])


class ProcessVmHandle(VmHandle):
    """A VM that lives and dies with one host process: our child (``popen``) or adopted from a
    state file (``popen`` is None, so only pid + start time say whether it still runs).

    Stop is SIGTERM, then SIGKILL after the timeout. Subclasses say why the VM ended
    (:meth:`exit_reason`) and may replace :meth:`_identity` where /proc does not exist.
    """

    #: seconds kill() waits for the process to go after SIGKILL
    KILL_WAIT = 5.0
    #: poll interval while waiting for a process that is not our child
    POLL = 0.02

    def __init__(
        self,
        pid: int,
        started: object | None,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self._pid = pid
        self._started = started
        self._popen = popen
        #: the last signal we sent, for exit_reason of an adopted process
        self._signalled: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def _identity(self) -> object | None:
        """The running process's fingerprint, comparable with ``started``; None when gone."""
        return start_time(self._pid) if alive(self._pid, None) else None

    def _same_process(self) -> bool:
        now = self._identity()
        return now is not None and (self._started is None or now == self._started)

    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self._same_process()

    def wait(self, timeout: float | None = None) -> bool:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._same_process():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL)
        return True

    def _signal(self, sig: int) -> None:
        if not self.is_running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, sig)
            self._signalled = sig

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM)
        if not self.wait(timeout):
            self.kill()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.wait(self.KILL_WAIT)

    def returncode(self) -> int | None:
        """Our child's exit code (negative: killed by that signal); None if unknown."""
        return self._popen.returncode if self._popen is not None else None
