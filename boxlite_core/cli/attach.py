"""The host side of `run -t` / `exec -t`: our terminal attached to a pty in the box.

What it promises (docker's habits): with ``-i`` our terminal is in raw mode while attached,
so every key (^C, ^Z, arrows) goes to the program in the box, whose pty turns ^C into SIGINT
there; the terminal's settings are restored on every way out (the program's exit, an error,
the box dying, SIGTERM/SIGHUP through the signal gate; only SIGKILL cannot be caught: ``stty
sane`` then). The window size is sent at start and on every SIGWINCH. ^P ^Q detaches: we
leave, the program keeps running. Raw mode and window sizes use the standard library's
``termios``/``tty`` (POSIX general terminal interface).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Protocol

from ..errors import ConfigError

#: docker's default detach keys: ctrl-p, ctrl-q
DETACH_KEYS = b"\x10\x11"
READ_CHUNK = 64 * 1024
_END = object()
_DETACH = object()


class TerminalCommand(Protocol):
    """What attaching drives: a tty command's output, input, window size."""

    def events(self) -> Iterator[tuple[str, bytes]]: ...

    def write_stdin(self, data: bytes) -> None: ...

    def resize(self, rows: int, cols: int) -> None: ...


def check_tty_input(interactive: bool) -> None:
    """``-it`` needs a terminal on our stdin (docker says the same).

    Raises:
        ConfigError: stdin is a pipe or file.
    """
    if interactive and not os.isatty(sys.stdin.fileno()):
        raise ConfigError(
            "the input device is not a TTY: -t with -i needs a terminal on stdin; "
            "to feed a pipe or file, drop -t (boxlite exec -i BOX CMD < FILE)")


def window_size() -> tuple[int, int] | None:
    """Our terminal's (rows, cols): from stdout, stdin or stderr, whichever is a terminal."""
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            cols, rows = os.get_terminal_size(fd)
            if rows > 0 and cols > 0:
                return rows, cols
    return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (no echo, no line editing, no ^C signal, no output
    processing); its settings restored on the way out, whatever the way."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class DetachFilter:
    """Finds the detach sequence in typed bytes. A first key of the sequence is held back
    until the next key shows whether the sequence follows (then nothing is sent) or not (then
    both are sent), as docker does."""

    def __init__(self, keys: bytes = DETACH_KEYS) -> None:
        self.keys = keys
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to send on, detach?) for what was just typed."""
        if not self.keys:
            return data, False
        data = self.held + data
        self.held = b""
        at = data.find(self.keys)
        if at >= 0:
            return data[:at], True
        for n in range(len(self.keys) - 1, 0, -1):  # a partial sequence at the end: hold it
            if data.endswith(self.keys[:n]):
                self.held = data[-n:]
                return data[:-n], False
        return data, False


class _WindowWatch:
    """SIGWINCH → a resize in the box. The handler only writes a byte to a pipe (nothing
    else is safe in a signal handler); a thread reads our size and sends it."""

    def __init__(self, resize: Callable[[int, int], None]) -> None:
        self.resize = resize
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous: object = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="boxlite-winch")

    def _handler(self, _signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"w")

    def _run(self) -> None:
        last = window_size()
        while True:
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            if not data or b"q" in data:
                return
            size = window_size()
            if size and size != last:
                last = size
                with contextlib.suppress(Exception):  # the command may have just ended
                    self.resize(*size)

    def __enter__(self) -> _WindowWatch:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGWINCH, self._handler)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGWINCH, self.previous)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            os.set_blocking(self.write_fd, True)
            os.write(self.write_fd, b"q")
        self.thread.join(timeout=5)
        os.close(self.write_fd)
        os.close(self.read_fd)


def _feed_keys(command: TerminalCommand, in_fd: int, stop_fd: int, detach_keys: bytes,
               events: queue.Queue[object]) -> None:
    """Our stdin → the box's terminal, until EOF, the stop pipe, detach or an error."""
    keys = DetachFilter(detach_keys)
    try:
        while True:
            ready, _w, _x = select.select([in_fd, stop_fd], [], [])
            if stop_fd in ready:
                return
            data = os.read(in_fd, READ_CHUNK)
            if not data:
                return  # our stdin closed: the program keeps its terminal, as docker does
            data, detach = keys.feed(data)
            if data:
                command.write_stdin(data)
            if detach:
                events.put(_DETACH)
                return
    except Exception:
        return  # the program ended or the box died: the output side reports it


def attach(command: TerminalCommand, *, interactive: bool, detach_keys: bytes = DETACH_KEYS,
           out_fd: int | None = None) -> bool:
    """Copy the box's terminal to our stdout (and, with ``interactive``, our keys to it) until
    its output ends (True) or the user detaches (False). Errors of the box (GuestError,
    BoxGoneError) propagate, after our terminal is restored."""
    out = out_fd if out_fd is not None else sys.stdout.fileno()
    in_fd = sys.stdin.fileno()
    events: queue.Queue[object] = queue.Queue()

    def pump() -> None:
        try:
            for _stream, data in command.events():
                events.put(data)
        except BaseException as exc:  # raised in the main thread
            events.put(exc)
        finally:
            events.put(_END)

    stop_r, stop_w = os.pipe()
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, stop_r)
        stack.callback(os.close, stop_w)
        if interactive and os.isatty(in_fd):
            stack.enter_context(raw_mode(in_fd))
        stack.enter_context(_WindowWatch(command.resize))
        threading.Thread(target=pump, daemon=True, name="boxlite-tty-out").start()
        if interactive:
            feeder = threading.Thread(target=_feed_keys, daemon=True, name="boxlite-tty-in",
                                      args=(command, in_fd, stop_r, detach_keys, events))
            feeder.start()
            stack.callback(feeder.join, 5)
            stack.callback(os.write, stop_w, b"q")  # runs first: the feeder stops reading
        while True:
            item = events.get()
            if item is _END:
                return True
            if item is _DETACH:
                return False
            if isinstance(item, BaseException):
                if os.isatty(out):  # the error line starts on a line of its own
                    with contextlib.suppress(OSError):
                        os.write(out, b"\r\n")
                raise item
            assert isinstance(item, bytes)
            view = memoryview(item)
            while view:
                view = view[os.write(out, view):]
