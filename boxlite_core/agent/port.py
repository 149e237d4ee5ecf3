"""The agent's end of the host channel: READY line, then relay bytes to the gRPC server.

Why a relay rather than serving gRPC on the port directly: grpcio can only serve on sockets.
The port is one byte stream, so each host attachment gets a fresh connection to the local
server: when the host disconnects (EOF / POLLHUP), the server connection is dropped and the
agent writes READY again, which blocks until the next host process connects.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
from pathlib import Path

from ..proto.wire import AGENT_PORT_NAME, READY
from .pid1 import log

CHUNK = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024


def find_virtio_port(name: str = AGENT_PORT_NAME) -> str:
    """/sys/class/virtio-ports/vportNpM/name == name → /dev/vportNpM (devtmpfs, no udev)."""
    base = Path("/sys/class/virtio-ports")
    for entry in sorted(base.glob("vport*")) if base.is_dir() else []:
        try:
            if (entry / "name").read_text().strip() == name:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {base}")


class Endpoint:
    """What the host side looks like to the relay: a virtio port fd or (tests) a socket."""

    def wait_host(self) -> int:
        """Block until a host is attached; write READY; return the fd to relay on."""
        raise NotImplementedError

    def detach(self, fd: int) -> None:
        """The host went away; release what wait_host returned."""


class VirtioPort(Endpoint):
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def wait_host(self) -> int:
        # Blocking write: virtio_console blocks writers until the host side is connected.
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        _write_all(self.fd, READY)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        return self.fd

    def detach(self, fd: int) -> None:
        # Drain whatever the old host left in the port so the next one starts clean.
        try:
            while os.read(fd, CHUNK):
                pass
        except OSError:
            pass


class ListeningSocket(Endpoint):
    """Test stand-in for the port: each accepted connection is one host attachment."""

    def __init__(self, path: str) -> None:
        old = os.umask(0o177)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(1)
        self._conn: socket.socket | None = None

    def wait_host(self) -> int:
        conn, _ = self.sock.accept()
        conn.sendall(READY)
        conn.setblocking(False)
        self._conn = conn
        return conn.fileno()

    def detach(self, fd: int) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def serve_forever(endpoint: Endpoint, server_socket: str) -> None:
    """READY → relay → host gone → READY again, forever."""
    while True:
        fd = endpoint.wait_host()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(server_socket)
            server.setblocking(False)
            _relay(fd, server)
        except OSError as exc:
            log(f"relay ended: {exc}")
        finally:
            server.close()
            endpoint.detach(fd)


def _relay(port: int, server: socket.socket) -> None:
    """Single-threaded poll loop so no write can block on a port whose host has left.

    Two blocking threads would risk one thread stuck writing stale HTTP/2 bytes that would
    then reach the *next* host before its READY line.
    """
    sfd = server.fileno()
    to_port = bytearray()
    to_server = bytearray()
    poller = select.poll()
    hup = select.POLLHUP | select.POLLERR
    while True:
        pmask = (select.POLLIN if len(to_server) < HIGH_WATER else 0) | (
            select.POLLOUT if to_port else 0
        )
        smask = (select.POLLIN if len(to_port) < HIGH_WATER else 0) | (
            select.POLLOUT if to_server else 0
        )
        poller.register(port, pmask)
        poller.register(sfd, smask)
        for fd, ev in poller.poll():
            if fd == port:
                if ev & select.POLLIN:
                    data = _read(port)
                    if data == b"":
                        return  # host disconnected
                    if data:
                        to_server += data
                elif ev & hup:
                    return
                if ev & select.POLLOUT and to_port:
                    n = _write(port, to_port)
                    del to_port[:n]
            else:
                if ev & select.POLLIN:
                    data = _read(sfd)
                    if data == b"":
                        return  # server closed (agent shutting down)
                    if data:
                        to_port += data
                elif ev & hup:
                    return
                if ev & select.POLLOUT and to_server:
                    n = _write(sfd, to_server)
                    del to_server[:n]


def _read(fd: int) -> bytes | None:
    """Bytes read, b"" at EOF, None when nothing is available yet (EAGAIN)."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            return b""
        raise


def _write(fd: int, data: bytearray) -> int:
    try:
        return os.write(fd, data[:CHUNK])
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            raise ConnectionError("peer went away") from exc
        raise
