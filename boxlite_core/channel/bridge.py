"""SerialBridge: many short gRPC connections over the one virtio-serial port stream.

Why: grpc dials sockets, and the port is a single byte stream whose guest end resets on every
re-attach. The bridge listens on a private unix socket (mode 0600) and relays one gRPC
connection at a time onto a fresh port attach (READY read by :func:`port.open_port`), so two
HTTP/2 sessions never share one stream. The shim (channel/shim.py) runs one for the box;
``virtio-serial-inproc`` runs one in the calling process (benchmarks and diagnosis).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError
from .port import PortGone, open_port
from .target import Transport

_umask_lock = threading.Lock()


def listen_private(path: Path, *, backlog: int) -> socket.socket:
    """A unix socket listening at ``path`` that is never group/world-open, not even for the
    instant between bind() and chmod() (it relays to the guest agent: whoever connects can
    run commands in the box)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask_lock:  # umask is process-wide
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def relay(a: socket.socket, b: socket.socket, first_to_a: bytes) -> None:
    """Copy both ways until either side closes, then tear both down."""
    done = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            done.set()
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    if first_to_a:
        try:
            a.sendall(first_to_a)
        except OSError:  # gRPC gave up on this connection already; the caller resets the port
            return
    t = threading.Thread(target=pump, args=(b, a), daemon=True, name="bridge-port>grpc")
    t.start()
    pump(a, b)
    t.join()



class SerialBridge(Transport):
    """Listening unix socket relaying one gRPC connection at a time to the port.

    eager: after a relay ends, open the next port connection at once (the shim holds the port
    this way, and a refused reopen tells it the VM is gone: on_port_lost(reason) is called and
    the bridge stops).
    ready_retry: seconds a re-attach may wait for READY before it is dropped and made again
    (see open_port's ready_timeout)."""

    def __init__(
        self,
        port_path: Path,
        bridge_path: Path,
        first: tuple[socket.socket, bytes],
        *,
        reconnect_timeout: float,
        is_alive: Callable[[], bool],
        console_tail: Callable[[], str],
        eager: bool = False,
        on_port_lost: Callable[[str], None] | None = None,
        reopen_delay: float = 0.0,
        ready_retry: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.port_path = port_path
        self._reopen_delay = reopen_delay
        self._ready_retry = ready_retry
        self._log = log or (lambda _msg: None)
        self._eager = eager
        self._on_port_lost = on_port_lost
        self.bridge_path = bridge_path
        self._pending: tuple[socket.socket, bytes] | None = first
        self._reconnect_timeout = reconnect_timeout
        self._is_alive = is_alive
        self._console_tail = console_tail
        self._closed = threading.Event()
        self._closing = False  # close() was called (a lost port sets only _closed)
        self._active: list[socket.socket] = []
        with contextlib.suppress(FileNotFoundError):
            bridge_path.unlink()
        self.listener = listen_private(bridge_path, backlog=4)
        self.target = f"unix:{bridge_path}"
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="agent-bridge")
        self._thread.start()

    def _reopen(self) -> tuple[socket.socket, bytes] | None:
        """A fresh port connection (READY read), or None; a gone port ends the bridge."""
        try:
            return open_port(
                self.port_path,
                deadline=time.monotonic() + self._reconnect_timeout,
                is_alive=lambda: self._is_alive() and not self._closed.is_set(),
                console_tail=self._console_tail,
                gone_if_refused=self._eager,
                ready_timeout=self._ready_retry,
                log=self._log,
            )
        except PortGone as exc:
            self.last_error = str(exc)
            if self._on_port_lost is not None and not self._closed.is_set():
                self._on_port_lost(str(exc))
            self._closed.set()
        except (GuestError, OSError) as exc:
            self.last_error = str(exc)
        return None

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            pending, self._pending = self._pending, None
            if pending is None:
                pending = self._reopen()
                if pending is None:
                    client.close()  # gRPC sees UNAVAILABLE; the client maps it to GuestError
                    continue
            port_sock, leftover = pending
            self._active = [client, port_sock]
            try:
                relay(client, port_sock, leftover)
            except OSError as exc:  # one broken connection must not end the bridge
                self.last_error = f"bridge connection failed: {exc}"
            finally:
                self._active = []
                client.close()
                port_sock.close()
            if self._eager and not self._closed.is_set():
                self._log(f"port connection ended ({self.last_error or 'closed'}); re-opening")
                # Let the guest see the detach (virtio-serial host_connected drops) before we
                # attach again; an instant re-attach could go unnoticed and never bring READY.
                self._closed.wait(self._reopen_delay)
                self._pending = self._reopen()
                if self._closing:  # the failed re-open is ours, not the VM's: do not report it
                    if self._pending is not None:
                        self._pending[0].close()
                    return
                self._log("READY again" if self._pending else f"re-open: {self.last_error}")

    def close(self) -> None:
        self._closing = True
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in list(self._active):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._pending is not None:
            self._pending[0].close()
            self._pending = None
        with contextlib.suppress(FileNotFoundError):
            self.bridge_path.unlink()
        self._thread.join(timeout=2)
