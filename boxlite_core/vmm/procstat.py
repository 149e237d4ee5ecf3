"""Host processes a box depends on (a VMM, a launcher, a file server, the agent shim), known
by pid + start time.

Boxes outlive the process that started them: a later ``boxlite`` command re-adopts the VM from
the pid in its state file. A pid alone is not an identity (the kernel recycles them), so every
record also keeps the process's start time (field 22 of ``/proc/PID/stat``, clock ticks since
boot) and a process only counts as ours when both match. A zombie counts as gone: it has
exited, its parent just has not collected the status yet.

Standard library only: the per-box agent shim imports this at every box start, so it must
not pull in attrs or the models. Handles for one-process VMs: :mod:`.process`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (fields[0] is the state), None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if there is no such process.

    A zombie still has one, so a record written right after a quick death stays exact."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """``pid`` runs, is not a zombie, and (when ``started`` is known) is the same process."""
    if pid <= 0:
        return False
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def reap(pid: int) -> int | None:
    """Collect ``pid``'s exit status if it is our exited child (raw wait status), else None.
    Never blocks; harmless for a pid that is not our child."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None


def terminate(pid: int, started: int | None, grace: float) -> bool:
    """SIGTERM ``pid`` if it is still the process that started at ``started``; SIGKILL it if
    it outlives ``grace`` seconds. True if it was running. Never signals a recycled pid (the
    identity is checked before each signal)."""
    if not alive(pid, started):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid, started) and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.02)
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def log_tail(path: Path | str, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log (reading at most its last ``max_bytes``): what error
    messages quote so a failure explains itself. Empty when the log is missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def live_record(path: Path) -> dict | None:
    """The JSON record of a helper process (``{"pid", "start_time", ...}``, e.g. a box's
    network relay or libvirt stream bridge) if that very process still runs, else None."""
    try:
        info = json.loads(Path(path).read_text())
        pid, started = int(info["pid"]), int(info["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if alive(pid, started) else None


def stop_recorded(path: Path, grace: float) -> bool:
    """End the process a :func:`live_record` names (SIGTERM, SIGKILL after ``grace`` s),
    then remove the record once nothing it names runs. True if the process was running."""
    info = live_record(path)
    stopped = False
    if info is not None:
        stopped = terminate(int(info["pid"]), int(info["start_time"]), grace)
    if live_record(path) is None:
        with contextlib.suppress(OSError):
            Path(path).unlink()
    return stopped
