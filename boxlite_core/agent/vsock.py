"""The agent's vsock endpoint (libkrun, hvf): every accepted stream is one gRPC client.

Why this differs from the virtio-serial port: vsock is connection-oriented. The backend turns
each host connect on the box's unix socket into a *new* guest stream, so there is no READY
line (the host's first Ping is its readiness check) and no re-attach reset; several streams
may be live at once (a new host process while an old stream drains). Each gets its own relay
thread and its own connection to the local gRPC server, reusing the serial path's poll relay.

The port comes from the kernel cmdline (``boxlite.agent_vsock=PORT``, proto/wire.py's
AGENT_VSOCK_CMDLINE_KEY, which the core adds for a backend whose channel is vsock).
Natively, tests listen on a unix socket path instead: the relay is the same.
"""

from __future__ import annotations

import socket
import threading
import time

from ..proto.wire import AGENT_VSOCK_CMDLINE_KEY
from .pid1 import log
from .port import _relay

BACKLOG = 16


def cmdline_port(cmdline: str) -> int | None:
    """The port in ``boxlite.agent_vsock=PORT`` (last one wins, as the kernel does), or None."""
    port = None
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if key == AGENT_VSOCK_CMDLINE_KEY and sep:
            try:
                port = int(value, 0)
            except ValueError as exc:
                raise ValueError(f"kernel cmdline {word!r}: the port must be an integer") from exc
    return port


def read_cmdline_port(path: str = "/proc/cmdline") -> int | None:
    try:
        with open(path) as fh:
            return cmdline_port(fh.read())
    except FileNotFoundError:
        return None


class Listener:
    """A listening vsock (or, natively, unix) socket whose streams are relayed to gRPC."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where

    @classmethod
    def vsock(cls, port: int) -> Listener:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        return cls(sock, f"vsock port {port}")

    @classmethod
    def unix(cls, path: str) -> Listener:
        """Test stand-in for the vsock port; 0600 like the host's bridge socket."""
        import os

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
        return cls(sock, path)

    def serve_forever(self, server_socket: str) -> None:
        """Accept streams forever; each is relayed in its own daemon thread."""
        log(f"serving streams on {self.where}")
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:  # e.g. EMFILE: keep serving once fds free up
                log(f"accept on {self.where} failed: {exc}")
                time.sleep(0.1)
                continue
            threading.Thread(
                target=_serve_one, args=(conn, server_socket), name="vsock-relay", daemon=True
            ).start()


def _serve_one(conn: socket.socket, server_socket: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(server_socket)
        server.setblocking(False)
        conn.setblocking(False)
        _relay(conn.fileno(), server)
    except OSError as exc:
        log(f"stream relay ended: {exc}")
    finally:
        server.close()
        conn.close()
