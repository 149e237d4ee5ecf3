"""Which live processes still name a box: the orphan check of the start-interruption tests.

``from boxlite_testing.orphans import naming``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def command_lines() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every process this host shows in /proc (no procps needed); processes
    that end while being read are left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            found.append((int(entry.name), argv))
    return found


def _bound_under(prefixes: tuple[str, ...]) -> set[str]:
    """``socket:[INODE]`` links of the unix sockets bound under one of ``prefixes``."""
    found = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            parts = line.split(None, 7)
            if len(parts) == 8 and parts[7].startswith(prefixes):
                found.add(f"socket:[{parts[6]}]")
    return found


def naming(box_dir: Path, box_id: str, *more: str) -> list[tuple[int, str]]:
    """Every live process (but this one) that names the box directory, its id, or one of
    ``more`` (the volume's host path): in its command line, or through an open file, its
    working directory or a unix socket bound there (virtiofsd gets its socket as an fd)."""
    needles = (str(box_dir), box_id, *more)
    paths = (str(box_dir) + "/", *(m.rstrip("/") + "/" for m in more))
    sockets = _bound_under(paths)
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X"):
            continue
        text = raw.replace(b"\0", b" ").decode(errors="replace")
        if any(n in text for n in needles) or _holds(entry, paths, sockets):
            found.append((int(entry), text[:200]))
    return found


def _holds(pid: str, paths: tuple[str, ...], sockets: set[str]) -> bool:
    links = [f"/proc/{pid}/cwd"]
    with contextlib.suppress(OSError):
        links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    for link in links:
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            if target in sockets or (target + "/").startswith(paths):
                return True
    return False
