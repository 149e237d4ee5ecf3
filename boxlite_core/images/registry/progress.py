"""Per-layer download progress: a rich bar per blob on a terminal, nothing otherwise.

Pulls run layer downloads in parallel threads, so the sink must be thread-safe; rich's
Progress is. Output goes to stderr (stdout is for what the user asked for).
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.progress import TaskID


class PullProgress(Protocol):
    def start(self, key: str, label: str, total: int) -> None: ...

    def advance(self, key: str, n: int) -> None: ...

    def done(self, key: str, note: str) -> None: ...


class QuietProgress:
    """The default: libraries and pipes get no progress output."""

    def __enter__(self) -> QuietProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, key: str, label: str, total: int) -> None:
        pass

    def advance(self, key: str, n: int) -> None:
        pass

    def done(self, key: str, note: str) -> None:
        pass


class RichPullProgress:
    """One bar per layer (description, bar, bytes, speed) on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichPullProgress:
        self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def start(self, key: str, label: str, total: int) -> None:
        with self._lock:
            self._tasks[key] = self._progress.add_task(label, total=total or None)

    def advance(self, key: str, n: int) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._progress.advance(task, n)

    def done(self, key: str, note: str) -> None:
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                task = self._tasks[key] = self._progress.add_task(key, total=1)
        info = next(t for t in self._progress.tasks if t.id == task)
        total = info.total or info.completed or 1
        self._progress.update(
            task, completed=total, total=total, description=f"{info.description} {note}"
        )


def default_progress() -> RichPullProgress | QuietProgress:
    """Rich bars when stderr is a terminal, else quiet (CI logs stay clean)."""
    return RichPullProgress() if sys.stderr.isatty() else QuietProgress()
