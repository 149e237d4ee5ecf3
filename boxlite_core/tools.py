"""External programs: found before use, run with argv lists, failures explained.

Why a module of its own: every program boxlite starts (qemu-system-*, qemu-img, mkfs.ext4,
virtiofsd, apt-get, ...) must fail the same way when missing — naming the Debian package —
and must never go through a shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import EngineError, ToolMissingError

#: Debian package that ships each program we use, for the "install it" hint.
PACKAGES: dict[str, str] = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "busybox": "busybox-static",
    "mmdebstrap": "mmdebstrap",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "virtiofsd": "qemu-system-common",
    "depmod": "kmod",
    "libvirtd": "libvirt-daemon-system",
    "gcc": "gcc",
    "tar": "tar",
}

#: Places outside PATH where Debian installs programs we need (virtiofsd lives in a libexec dir).
EXTRA_DIRS: dict[str, tuple[str, ...]] = {
    "virtiofsd": ("/usr/libexec", "/usr/lib/qemu"),
}


def find_tool(name: str) -> str | None:
    """Return the program's absolute path, or None when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for directory in (*EXTRA_DIRS.get(name, ()), "/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str, package: str | None = None, why: str = "") -> str:
    """Return the program's path or raise ToolMissingError naming the package to install."""
    path = find_tool(name)
    if path is None:
        raise ToolMissingError(name, package or PACKAGES.get(name), why)
    return path


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program (argv list, no shell) and capture its output.

    On a non-zero exit, raise EngineError carrying the command and the tail of its stderr,
    because "qemu-img failed" alone sends the user hunting.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("run() needs a program")
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(args[0], PACKAGES.get(Path(args[0]).name)) from exc
    except subprocess.TimeoutExpired as exc:
        name = Path(args[0]).name
        raise EngineError(f"{name} timed out after {timeout}s: {' '.join(args)}") from exc
    if check and proc.returncode != 0:
        detail = _tail(proc.stderr) or _tail(proc.stdout)
        raise EngineError(
            f"{Path(args[0]).name} exited with {proc.returncode}: {' '.join(args)}"
            + (f"\n{detail}" if detail else "")
        )
    return proc
