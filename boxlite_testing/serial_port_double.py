"""Test double of QEMU's virtio-serial chardev for a guest agent that is a plain gRPC server.

Each host attach gets READY, then its bytes are relayed to the gRPC server at ``upstream``,
as the guest agent's port does. Tests put their own gRPC server there (a hostile agent, one
that fails on cue) behind the real host client and the real per-box shim.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from boxlite_core.proto.wire import READY


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` → ``dst`` until either ends, then shut both down (the other direction's
    pump then ends too): one direction of a relayed stream connection."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serial_port_double(port: Path, upstream: Path) -> Iterator[None]:
    """Listen at ``port`` (where the shim finds the box's agent port) while the block runs."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(port))
    listener.listen(8)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(READY)
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(str(upstream))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        listener.close()
