"""A small tmpfs mounted for one test: a real filesystem that fills up, for disk-space tests.

``from boxlite_testing.tmpfs import small_tmpfs``. Needs root.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "20m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount's syntax, e.g. "16m") at ``where``, mode 0700; always
    unmounted (lazily, so a file a failing test left open cannot keep it busy)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
