"""Process identity (pid + start time), so a recycled pid is never taken for our runner.

macOS has no /proc, so the start time comes from ``ps -o lstart=`` there; Linux (where the
tests run the runner against a framework double) reads /proc/PID/stat. Either way the value
is an opaque string that only has to compare equal for the same process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start-time fingerprint, or None if no such process exists."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return None
        # comm (field 2) may hold spaces/parens: split after the last ')'
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
            return None
        return f"linux:{fields[19]}"
    try:
        out = subprocess.run(
            ["ps", "-o", "stat=,lstart=", "-p", str(pid)],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out or out.startswith("Z"):
        return None
    return "ps:" + " ".join(out.split()[1:])


def alive(pid: int, fingerprint: str | None) -> bool:
    """True if ``pid`` runs and is the same process that had ``fingerprint``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = start_time(pid)
    return now is not None and (fingerprint is None or now == fingerprint)
