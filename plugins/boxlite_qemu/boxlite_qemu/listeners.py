"""The unix sockets QEMU serves (console, QMP, agent port), bound by the host before QEMU runs.

Why: a socket QEMU creates itself appears only once QEMU has parsed its argv and opened its
chardevs, and the console chardev (``wait=on``) then blocks QEMU until the capped log writer,
a Python process started alongside, has connected: ~0.1 s of every start went to that wait and
to polling for ``qmp.sock``. Bound here instead, each socket exists before QEMU starts: the
writer's connection is made at once (it waits in the listen backlog and QEMU accepts it as
soon as it opens the chardev, so ``wait=on`` still holds back the guest and no boot line is
lost), and a QMP or agent client can connect at once and simply waits for QEMU's greeting.
QEMU takes each listening socket as ``-chardev socket,fd=N,server=on`` (the form libvirt uses
for its monitor socket; QEMU's ``socket_get_fd`` parses a number given on the command line).

The plan's argv keeps the ``path=`` form (what a person would type, and what plan.json
shows); :func:`pass_listeners` rewrites it for the one launch. vm.json records the argv QEMU
really got. QEMU does not unlink a socket it was handed, so a stale file can outlive QEMU;
launch unlinks stale sockets before binding, and a client of a dead QEMU's socket is refused
exactly as if the file were missing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from boxlite_core.channel.bridge import listen_private
from boxlite_core.errors import EngineError

from .argv import qopt

#: seconds connect_now waits (it returns at once unless the listen backlog is full)
CONNECT_TIMEOUT = 5.0


def bind_listener(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (0600 from the start, a stale file replaced;
    ``channel.bridge.listen_private``).

    Raises:
        EngineError: the path cannot be bound (naming it and the reason).
    """
    try:
        path.unlink(missing_ok=True)
        return listen_private(path, backlog=8)
    except OSError as exc:
        raise EngineError(f"cannot create the socket {path} for QEMU: {exc}") from exc


@contextlib.contextmanager
def bound(paths: Iterable[Path]) -> Iterator[dict[str, socket.socket]]:
    """Bind every path (``{str(path): socket}``); on the way out this process's copies are
    closed (QEMU keeps its own). On a failure the files bound so far are removed too."""
    socks: dict[str, socket.socket] = {}
    try:
        for path in paths:
            socks[str(path)] = bind_listener(Path(path))
        yield socks
    except BaseException:
        for path in socks:
            Path(path).unlink(missing_ok=True)
        raise
    finally:
        for sock in socks.values():
            sock.close()


def connect_now(path: Path) -> socket.socket:
    """A client connection to a socket :func:`bind_listener` made: it completes at once (the
    backlog holds it until QEMU accepts), bounded by :data:`CONNECT_TIMEOUT` all the same.

    Raises:
        EngineError: the connection was refused or timed out (naming the socket).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)  # a full backlog would block a unix connect()
        sock.connect(os.fspath(path))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise EngineError(f"cannot connect to {path}, bound for QEMU a moment ago: {exc}") from exc
    return sock


def _split_options(value: str) -> list[str]:
    """QEMU's ``key=value,...`` string split at single commas (``,,`` is an escaped comma
    and stays inside its option, as written)."""
    opts, start, i = [], 0, 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                i += 2
                continue
            opts.append(value[start:i])
            start = i + 1
        i += 1
    opts.append(value[start:])
    return opts


def pass_listeners(argv: list[str], fds: Mapping[str, int]) -> list[str]:
    """``argv`` with each ``-chardev socket,...,path=P,...`` whose P is in ``fds`` (by path)
    turned into ``fd=N``: the listening socket QEMU inherits. Other arguments are untouched.

    Raises:
        EngineError: a path in ``fds`` names no chardev of ``argv`` (a plan and a launch that
            disagree: QEMU would serve a socket nobody bound).
    """
    wanted = {f"path={qopt(path)}": f"fd={fd}" for path, fd in fds.items()}
    found: set[str] = set()
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg != "-chardev" or not out[i + 1].startswith("socket,"):
            continue
        opts = _split_options(out[i + 1])
        for j, opt in enumerate(opts):
            if opt in wanted:
                opts[j] = wanted[opt]
                found.add(opt)
        out[i + 1] = ",".join(opts)
    missing = sorted(set(wanted) - found)
    if missing:
        raise EngineError(f"QEMU's argv has no socket chardev with {', '.join(missing)}")
    return out
