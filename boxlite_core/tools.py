"""External programs: found before use, run with argv lists, failures explained.

Why a module of its own: every program boxlite starts (qemu-system-*, qemu-img, mkfs.ext4,
virtiofsd, apt-get, ...) must fail the same way when missing — naming the Debian package —
and must never go through a shell.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import envvars
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


#: default bound on a program boxlite runs (seconds); a slow host raises it
ENV_TOOL_TIMEOUT = "BOXLITE_TOOL_TIMEOUT"
DEFAULT_TOOL_TIMEOUT = 600.0


def default_timeout() -> float:
    """``BOXLITE_TOOL_TIMEOUT`` (seconds, > 0) or 600: the bound of a run() given none."""
    return envvars.seconds(ENV_TOOL_TIMEOUT, DEFAULT_TOOL_TIMEOUT)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the program and everything it started (its own session), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    what: str = "",
) -> subprocess.CompletedProcess[bytes]:
    """Run a program (argv list, no shell) and capture its output; always bounded in time.

    ``timeout``: seconds; None means the default bound (``BOXLITE_TOOL_TIMEOUT``, 600 s) —
    there is no unbounded run. On expiry the program and its children (it runs in its own
    session) are killed and EngineError names the program, the bound and ``what`` it was
    doing. On a non-zero exit, raise EngineError carrying the command and the tail of its
    stderr, because "qemu-img failed" alone sends the user hunting.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("run() needs a program")
    bound = default_timeout() if timeout is None else timeout
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # so a timeout can kill the whole group
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(args[0], PACKAGES.get(Path(args[0]).name)) from exc
    try:
        stdout, stderr = proc.communicate(input, timeout=bound)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        name = Path(args[0]).name
        doing = f" ({what})" if what else ""
        raise EngineError(
            f"{name}{doing} did not finish within {bound:g} s and was killed: {' '.join(args)}; "
            f"if this host is just slow, raise {ENV_TOOL_TIMEOUT} (seconds)") from exc
    except BaseException:
        _kill_group(proc)
        raise
    completed = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and completed.returncode != 0:
        detail = _tail(completed.stderr) or _tail(completed.stdout)
        raise EngineError(
            f"{Path(args[0]).name} exited with {completed.returncode}: {' '.join(args)}"
            + (f"\n{detail}" if detail else "")
        )
    return completed
