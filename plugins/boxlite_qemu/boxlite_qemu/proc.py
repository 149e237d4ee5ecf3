"""Process identity: a pid plus its start time, so a recycled pid is never taken for our VM.

The start time is field 22 of /proc/PID/stat (clock ticks since boot). A zombie counts as
dead: is_running must not lie while an exited child waits to be reaped.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = text[text.rfind(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])  # field 22


def alive(pid: int, started: int | None) -> bool:
    """True if ``pid`` exists, is not a zombie, and (when known) started at ``started``."""
    fields = _stat_fields(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def reap(pid: int) -> int | None:
    """waitpid(WNOHANG) if ``pid`` is our child: its raw wait status, or None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None
