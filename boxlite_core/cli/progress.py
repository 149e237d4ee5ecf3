"""Progress for long steps (boot, kit build, image import): always on stderr.

stdout belongs to the command a box runs (`boxlite run ... > out` must capture only that), so
progress never goes there. On a terminal it is a rich spinner line; elsewhere plain lines, or
nothing at all where the caller says progress would be noise (``boxlite run`` off a tty).
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.status import Status


class Reporter:
    """A ``progress(message, fraction)`` callable; thread-safe (stages run in parallel)."""

    def __init__(self, mode: str | None = None, *, plain_off_tty: bool = True) -> None:
        if mode is None:
            tty = sys.stderr.isatty()
            mode = "rich" if tty else ("plain" if plain_off_tty else "quiet")
        self.mode = mode
        self._lock = threading.Lock()
        self._last: str | None = None
        self._status: Status | None = None  # rich is imported only on a terminal

    def __enter__(self) -> Reporter:
        if self.mode == "rich":
            from rich.console import Console

            self._status = Console(stderr=True).status("starting…")
            self._status.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __call__(self, message: str, fraction: float | None = None) -> None:
        text = message if fraction is None else f"{message} ({fraction * 100:.0f}%)"
        with self._lock:
            if self.mode == "rich" and self._status is not None:
                self._status.update(text)
            elif self.mode == "plain" and message != self._last:
                print(f"boxlite: {text}", file=sys.stderr, flush=True)
            self._last = message
