"""Duties of the guest's PID 1: reap zombies without stealing tracked statuses, log to the
console, and power off instead of exiting (PID 1 exiting panics the kernel).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable

from . import libc

STARTED = time.monotonic()


def log(message: str) -> None:
    """One line to stderr (the console in the guest); os.write so forked children can use it."""
    try:
        os.write(2, f"boxlite-agent[{os.getpid()}]: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def power_off(reason: str, *, reboot: bool = False) -> None:
    """Sync and power the VM off; as a non-PID-1 (native tests) just exit."""
    log(f"powering off: {reason}")
    os.sync()
    if os.getpid() != 1:
        os._exit(0)
    try:
        libc.reboot(libc.RB_AUTOBOOT if reboot else libc.RB_POWER_OFF)
    except OSError as exc:
        log(f"reboot(2) failed: {exc}")
    while True:  # never return from PID 1
        time.sleep(3600)


def fatal(exc: BaseException) -> None:
    """Print the traceback where a human will look (console), then power off."""
    text = "".join(traceback.format_exception(exc))
    for path in ("/dev/console", None):
        try:
            if path:
                with open(path, "w") as console:
                    console.write(f"boxlite-agent: fatal error\n{text}")
            else:
                os.write(2, f"boxlite-agent: fatal error\n{text}".encode())
            break
        except OSError:
            continue
    if os.getpid() == 1:
        power_off("fatal error in the agent")
    os._exit(70)


class Reaper:
    """The only caller of waitpid in the agent.

    Why one thread owns waitpid(-1): as PID 1 the agent inherits every orphan in the guest and
    must reap them, but a blind waitpid(-1) would steal the statuses of processes an exec is
    tracking. So every fork goes through `spawn`, which registers the pid under the same lock
    the reaper holds while dispatching: a tracked status always reaches its owner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def spawn(self, child: Callable[[], None], on_exit: Callable[[int], None]) -> int:
        """Fork; the child runs `child` (which must never return); on_exit gets the status."""
        with self._lock:
            pid = os.fork()
            if pid == 0:
                try:
                    child()
                finally:
                    os._exit(127)
            self._waiters[pid] = on_exit
        self._kick.set()
        return pid

    def _run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._kick.wait(0.5)
                self._kick.clear()
                continue
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            with self._lock:
                waiter = self._waiters.pop(pid, None)
            if waiter is not None:
                try:
                    waiter(status)
                except Exception as exc:  # a bad callback must not kill the reaper
                    log(f"reaper callback for {pid} failed: {exc!r}")
