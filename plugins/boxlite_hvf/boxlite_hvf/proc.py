"""Process identity (pid + start time), so a recycled pid is never taken for our runner.

macOS has no /proc, so the start time comes from ``ps -o lstart=`` there; Linux (where the
tests run the runner against a framework double) reads /proc/PID/stat. Either way the value
is an opaque string that only has to compare equal for the same process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from boxlite_core.vmm import procstat


def start_time(pid: int) -> str | None:
    """The process's start-time fingerprint, or None if no such process runs."""
    if Path("/proc/self/stat").exists():
        ticks = procstat.start_time(pid) if procstat.alive(pid, None) else None
        return None if ticks is None else f"linux:{ticks}"
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
