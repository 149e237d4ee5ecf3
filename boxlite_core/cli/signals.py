"""The signal gate: SIGINT, SIGTERM and SIGHUP take one teardown path (notes/cli-lifecycle.md).

The first teardown signal becomes :class:`Interrupted` in the main thread, so every `finally`
(stop, --rm) runs as for ^C; later ones are noted and ignored, so a second ^C cannot leave a VM
behind (SIGKILL still can: nothing catches it). Installed by ``main()``, never by the library:
an embedding application owns its own signals.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

#: seconds the command in the box has to exit after the signal we forward, before SIGKILL
KILL_GRACE = 2.0
#: signals that tear a run down like ^C (SIGINT); installed by main(), never by the library
TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: raised in the main thread so every `finally` (stop,
    --rm) runs, as for ^C. A KeyboardInterrupt so library code that already cleans up after
    ^C (CleanupGuard) does the same for SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalGate:
    """Turns the first teardown signal into Interrupted; notes and ignores every later one.

    Why ignore later ones: a second ^C (or systemd's SIGTERM after our SIGINT) raised in the
    middle of stopping the VM would abandon the stop and orphan QEMU. While ``shielded``
    (teardown after a normal exit) even the first signal is only noted; main() reports it.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.shield_depth = 0

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self.shield_depth == 0:
            raise Interrupted(signum)

    def install(self) -> None:
        """Route TEARDOWN_SIGNALS here (main thread only; a signal ignored by our parent, e.g.
        SIGHUP under nohup, stays ignored)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in TEARDOWN_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, self.handler)

    def close(self) -> None:
        """The work is done, the exit status decided: ignore teardown signals from now on.
        Python restores the default action of signals with Python handlers while it shuts
        down, so a second SIGTERM in those last milliseconds would otherwise kill us with
        status -15 instead of the one main() chose (measured: a fast --rm teardown)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in TEARDOWN_SIGNALS:
            if signal.getsignal(sig) == self.handler:
                signal.signal(sig, signal.SIG_IGN)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Run a teardown that a signal must not cut short."""
        self.shield_depth += 1
        try:
            yield
        finally:
            self.shield_depth -= 1


#: the process's one gate (signal handlers are process-wide)
GATE = SignalGate()


def signal_name(signum: int) -> str:
    """"SIGTERM" for 15; "signal N" for a number that names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
