"""The host end of the virtio-serial agent port: attach, read READY, detect a gone VM.

Why its own module: the port is one byte stream a backend serves as a listening unix socket
(QEMU's ``-chardev socket,server=on`` at BOXDIR/agent.port); the guest agent writes ``READY\\n``
each time a host attaches, and only then speaks HTTP/2. Every user of the port (the shim's
bridge, the in-process bridge, tests and benchmarks that boot a VM by hand) attaches through
:func:`open_port`, which also tells a slow guest from a dead VM and from a wedged attach.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError
from ..proto.wire import READY

#: the port socket's name in the box directory (the backend serves it)
PORT_NAME = "agent.port"


class PortGone(GuestError):
    """The port socket refuses connections or is missing: nobody (no VM) listens any more."""


def dead_error(what: str, console_tail: Callable[[], str]) -> GuestError:
    tail = ""
    try:
        tail = console_tail() or ""
    except Exception as exc:  # the tail is a diagnosis aid; never mask the real error
        tail = f"(console tail unavailable: {exc})"
    tail = tail.strip()
    suffix = f"\n--- guest console (last lines) ---\n{tail}" if tail else " (console log empty)"
    return GuestError(f"the box's VM stopped {what}{suffix}")


def ready_timeout_error(path: Path, console_tail: Callable[[], str]) -> GuestError:
    tail = ""
    with contextlib.suppress(Exception):
        tail = console_tail().strip()
    return GuestError(
        f"timed out waiting for the guest agent's READY on {path}; the guest may be slow to "
        "boot or its agent failed"
        + (f"\n--- guest console (last lines) ---\n{tail}" if tail else "")
    )


def open_port(
    path: Path,
    *,
    deadline: float,
    is_alive: Callable[[], bool],
    console_tail: Callable[[], str],
    gone_if_refused: bool = False,
    ready_timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[socket.socket, bytes]:
    """Connect to the port socket and read the READY line; return the socket and any bytes
    that followed READY in the same read (the start of the server's HTTP/2 preface).

    gone_if_refused: a refused/missing socket raises PortGone at once. Used once the port has
    been seen: a chardev server with a client attached still queues connects, so only a VM
    that is gone refuses them.
    ready_timeout: give one connection this long to bring READY, then hang up and connect
    again. For re-attaches to a running guest: QEMU 7.2 can leave the port throttled after a
    host hung up while the guest was writing, and then the guest's next READY sits in the
    virtqueue for good; only a new detach (QEMU un-throttles and discards on close, the guest
    sees the hang-up and offers READY again) gets it going (notes/agent-stall.md)."""
    while True:
        if not is_alive():
            raise dead_error("before its guest agent became ready", console_tail)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if gone_if_refused:
                raise PortGone(f"the agent port {path} is gone ({exc.strerror})") from None
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out waiting for the agent socket {path} ({exc.strerror}); "
                    "check that the VM backend created it"
                ) from None
            time.sleep(0.05)
            continue
        buf = b""
        sock.settimeout(0.1)
        give_up = None if ready_timeout is None else time.monotonic() + ready_timeout
        pause = 0.05
        while READY not in buf:
            if not is_alive():
                sock.close()
                raise dead_error("before its guest agent became ready", console_tail)
            if time.monotonic() >= deadline:
                sock.close()
                raise ready_timeout_error(path, console_tail)
            if give_up is not None and time.monotonic() >= give_up:
                if log is not None:
                    log(f"no READY within {ready_timeout:.0f}s of attaching to {path}; "
                        "dropping this port connection and attaching again")
                pause = 0.2  # long enough for the guest to see this detach
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:  # queued, then the listener went away: re-check
                chunk = b""
            if not chunk:  # the chardev dropped us (VM exiting?): reconnect and re-check
                break
            buf += chunk
        else:
            sock.settimeout(None)
            return sock, buf.split(READY, 1)[1]
        sock.close()
        time.sleep(pause)
