"""A command on a pseudo-terminal in a box: what ``Box.exec(cmd, tty=True)`` returns.

Why a session object and not an ExecResult: a terminal program is a conversation (a shell
waits for what you type, a full-screen editor for keys and window sizes), so the caller
writes, reads what arrived, resizes, and finally waits for the exit status. Output is one byte
stream as a terminal shows it: stdout and stderr merged, and the pty's output processing
applied (a program's "\\n" arrives as "\\r\\n" unless it turns ``onlcr`` off, e.g. with
``stty -opost``). Keys are bytes: ``b"\\x03"`` is ^C and reaches the foreground job as SIGINT.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from types import TracebackType

from ..errors import ConfigError
from ..models import ExitStatus
from .boxexec import Execution

#: seconds a closed session's program has after SIGHUP (the terminal hung up) before SIGKILL
HANGUP_GRACE = 2.0
_END = object()


class Terminal:
    """A running tty command: ``write()`` keys, ``read()`` the screen's bytes,
    ``resize(rows, cols)``, ``wait()``. A context manager: leaving it hangs up a program that
    still runs (SIGHUP, then SIGKILL after :data:`HANGUP_GRACE` s), as closing a terminal
    window does.

    Errors: GuestError when the box's VM or agent fails; BoxGoneError when the box is stopped
    or removed underneath; ConfigError for a bad size.
    """

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self._chunks: queue.Queue[bytes | BaseException | object] = queue.Queue()
        self._pending = bytearray()
        self._ended = False
        self._pump = threading.Thread(target=self._pull, daemon=True,
                                      name="boxlite-terminal-out")
        self._pump.start()

    def _pull(self) -> None:
        try:
            for _stream, data in self.execution.events():
                self._chunks.put(data)
        except BaseException as exc:  # handed to the reader, raised there
            self._chunks.put(exc)
        finally:
            self._chunks.put(_END)

    # -- input -----------------------------------------------------------------------------
    def write(self, data: bytes | str) -> None:
        """Type ``data`` (str is encoded as UTF-8). Raises GuestError if the terminal is
        gone, ConfigError for other types."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"write({data!r}): give bytes or str")
        self.execution.write_stdin(bytes(data))

    # -- output ----------------------------------------------------------------------------
    def _take(self, timeout: float | None) -> bool:
        """Move one arrived chunk into the pending buffer; False at the end of output.
        TimeoutError when nothing arrives within ``timeout`` seconds."""
        if self._ended:
            return False
        try:
            item = self._chunks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no terminal output within {timeout:g} s") from None
        if item is _END:
            self._ended = True
            return False
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        assert isinstance(item, bytes)
        self._pending.extend(item)
        return True

    def read(self, timeout: float | None = None) -> bytes:
        """What the terminal showed since the last read: waits up to ``timeout`` seconds
        (None: forever) for at least one byte; b"" once the program and everything it
        started closed the terminal.

        Raises:
            TimeoutError: nothing arrived in time (the session goes on).
            GuestError, BoxGoneError: the box failed or went away.
        """
        if not self._pending:
            self._take(timeout)
        while not self._ended:  # whatever else already arrived, without waiting
            try:
                item_ready = self._take(0)
            except TimeoutError:
                break
            if not item_ready:
                break
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def read_until(self, expected: bytes | str, timeout: float = 30.0) -> bytes:
        """Read until ``expected`` shows up; returns everything up to and including it (the
        rest stays for the next read).

        Raises:
            TimeoutError: not seen within ``timeout`` seconds (what arrived stays unread).
            EOFError: the terminal closed first.
        """
        if isinstance(expected, str):
            expected = expected.encode()
        deadline = time.monotonic() + timeout
        while (at := self._pending.find(expected)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{expected!r} not seen on the terminal within {timeout:g} s;"
                                   f" last output: {bytes(self._pending[-200:])!r}")
            if not self._take(left):
                raise EOFError(f"the terminal closed before {expected!r} showed; "
                               f"last output: {bytes(self._pending[-200:])!r}")
        end = at + len(expected)
        data = bytes(self._pending[:end])
        del self._pending[:end]
        return data

    # -- control ---------------------------------------------------------------------------
    def resize(self, rows: int, cols: int) -> None:
        """Set the window size in character cells; the program gets SIGWINCH."""
        self.execution.resize(rows, cols)

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """The program's exit status (``returncode`` 128+N for signal N). TimeoutError if it
        still runs after ``timeout`` seconds."""
        return self.execution.wait(timeout)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the program (its process group in the box)."""
        self.execution.kill(sig)

    def close(self) -> None:
        """Hang up: SIGHUP a program that still runs, SIGKILL it after HANGUP_GRACE s."""
        with contextlib.suppress(TimeoutError, Exception):
            self.execution.wait(0)
            return
        self.execution.kill(signal.SIGHUP)
        with contextlib.suppress(TimeoutError, Exception):
            self.execution.wait(HANGUP_GRACE)
            return
        self.execution.kill(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.execution.wait(HANGUP_GRACE)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
