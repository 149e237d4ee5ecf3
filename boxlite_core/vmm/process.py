"""A VM that lives and dies with one host process: the handle for backends without a monitor.

Backends with a monitor (QEMU's QMP) use the functions of :mod:`.procstat` directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import TypeAlias

from .base import VmHandle
from .procstat import alive, start_time

#: a process's identity beside its pid, only ever compared for equality: the start time in
#: clock ticks (:func:`.procstat.start_time`), or a backend's own string where there is no
#: /proc (the hvf plugin's ``ps`` fingerprint)
Fingerprint: TypeAlias = int | str


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
        started: Fingerprint | None,
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

    def _identity(self) -> Fingerprint | None:
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
