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

#: bytes per read in the relay: 512 KiB = the whole receive queue of a virtio-serial port
#: (128 page buffers) in one readv
CHUNK = 512 * 1024
HIGH_WATER = 4 * 1024 * 1024
SERVER_SNDBUF = 1024 * 1024
#: A virtio-serial port moves at most one guest buffer (a page) per read and 32 KiB per write
#: (linux drivers/char/virtio_console.c: fill_readbuf, port_fops_write). The port has no
#: read_iter/write_iter, so readv/writev make the kernel call read/write once per piece,
#: stopping at a short one: up to CHUNK per system call and per pass of the poll loop, where
#: plain read/write moved 4 KiB / 32 KiB per pass (each pass is a few hundred microseconds
#: of Python under TCG). On a socket (tests, vsock) the pieces simply fill in order.
READ_PIECE = 4096
WRITE_PIECE = 32 * 1024


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
    # room for a whole read from the port in the socket (the default ~208 KiB took part of
    # each 512 KiB read; the rest was queued, a copy, and written on a later pass)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
    to_port = bytearray()
    to_server = bytearray()
    inbox = memoryview(bytearray(CHUNK))  # every read lands here first: no allocation
    port_pieces = [inbox[i : i + READ_PIECE] for i in range(0, CHUNK, READ_PIECE)]
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
                    n = _read(port, port_pieces)
                    if n == 0:
                        return  # host disconnected
                    if n:
                        _forward(inbox[:n], to_server, sfd, CHUNK)
                elif ev & hup:
                    return
                if ev & select.POLLOUT and to_port:
                    del to_port[: _write(port, to_port, WRITE_PIECE)]
            else:
                if ev & select.POLLIN:
                    n = _read(sfd, [inbox])
                    if n == 0:
                        return  # server closed (agent shutting down)
                    if n:
                        _forward(inbox[:n], to_port, port, WRITE_PIECE)
                elif ev & hup:
                    return
                if ev & select.POLLOUT and to_server:
                    del to_server[: _write(sfd, to_server, CHUNK)]


def _read(fd: int, pieces: list[memoryview]) -> int | None:
    """Bytes read into ``pieces`` (in order), 0 at EOF, None when nothing is available yet."""
    try:
        return os.readv(fd, pieces)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            return 0
        raise


def _forward(data: memoryview, queue: bytearray, fd: int, piece: int) -> None:
    """Send ``data`` (just read) on to ``fd``, queueing what does not go at once. With
    nothing queued before it, it is written straight from the read buffer: under TCG a
    Python-level copy of every byte (into the queue) cost as much as the system calls."""
    if not queue:
        data = data[_write(fd, data, piece) :]
    if data:
        queue += data


def _write(fd: int, data: bytearray | memoryview, piece: int) -> int:
    """Write up to CHUNK of ``data`` in pieces of ``piece`` bytes; bytes written (0: EAGAIN).
    The views are released before returning, so the caller can then delete what was sent."""
    with memoryview(data) as whole:
        end = min(len(data), CHUNK)
        parts = [whole[i : min(i + piece, end)] for i in range(0, end, piece)]
        try:
            return os.writev(fd, parts)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise ConnectionError("peer went away") from exc
            raise
        finally:
            for part in parts:
                part.release()
