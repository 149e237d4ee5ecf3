"""Host end of the agent channel: wait for READY, then bridge gRPC onto the guest's byte stream.

Two channel kinds, chosen by the backend:

* ``virtio-serial`` (QEMU, libvirt): BOXDIR/agent.port is a QEMU chardev socket server; the
  guest writes ``READY\\n`` when it sees a host attach, then the stream carries one HTTP/2
  connection. grpcio can only dial sockets, so a *bridge* listens at BOXDIR/agent.grpc.sock
  (mode 0600) and relays one gRPC connection at a time onto a fresh port connection (the guest
  resets its side on every re-attach, so two HTTP/2 sessions never share one stream).
* ``stream`` (libkrun vsock, ...): every connect to the backend's socket is its own stream to
  the agent and there is no READY line; gRPC dials that socket directly.
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

READY = b"READY\n"
PORT_NAME = "agent.port"
BRIDGE_NAME = "agent.grpc.sock"
KINDS = ("virtio-serial", "stream")
_umask_lock = threading.Lock()


def _dead_error(what: str, console_tail: Callable[[], str]) -> GuestError:
    tail = ""
    try:
        tail = console_tail() or ""
    except Exception as exc:  # the tail is a diagnosis aid; never mask the real error
        tail = f"(console tail unavailable: {exc})"
    tail = tail.strip()
    suffix = f"\n--- guest console (last lines) ---\n{tail}" if tail else " (console log empty)"
    return GuestError(f"the box's VM stopped {what}{suffix}")


def open_port(
    path: Path,
    *,
    deadline: float,
    is_alive: Callable[[], bool],
    console_tail: Callable[[], str],
) -> tuple[socket.socket, bytes]:
    """Connect to the port socket and read the READY line; return the socket and any bytes
    that followed READY in the same read (the start of the server's HTTP/2 preface)."""
    while True:
        if not is_alive():
            raise _dead_error("before its guest agent became ready", console_tail)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out waiting for the agent socket {path} ({exc.strerror}); "
                    "check that the VM backend created it"
                ) from None
            time.sleep(0.05)
            continue
        buf = b""
        sock.settimeout(0.1)
        while READY not in buf:
            if not is_alive():
                sock.close()
                raise _dead_error("before its guest agent became ready", console_tail)
            if time.monotonic() >= deadline:
                sock.close()
                tail = ""
                with contextlib.suppress(Exception):
                    tail = console_tail().strip()
                raise GuestError(
                    f"timed out waiting for the guest agent's READY on {path}; the guest may "
                    "be slow to boot (raise the timeout) or its agent failed"
                    + (f"\n--- guest console (last lines) ---\n{tail}" if tail else "")
                )
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:  # the chardev dropped us (VM exiting?): reconnect and re-check
                break
            buf += chunk
        else:
            sock.settimeout(None)
            return sock, buf.split(READY, 1)[1]
        sock.close()
        time.sleep(0.05)


def _relay(a: socket.socket, b: socket.socket, first_to_a: bytes) -> None:
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


class Transport:
    """What connect() returns: the target for grpc.insecure_channel, and close()."""

    target: str

    def close(self) -> None:  # pragma: no cover - overridden
        pass


class DirectStream(Transport):
    def __init__(self, path: Path) -> None:
        self.target = f"unix:{path}"


class SerialBridge(Transport):
    """Listening unix socket relaying one gRPC connection at a time to the port."""

    def __init__(
        self,
        port_path: Path,
        bridge_path: Path,
        first: tuple[socket.socket, bytes],
        *,
        reconnect_timeout: float,
        is_alive: Callable[[], bool],
        console_tail: Callable[[], str],
    ) -> None:
        self.port_path = port_path
        self.bridge_path = bridge_path
        self._pending: tuple[socket.socket, bytes] | None = first
        self._reconnect_timeout = reconnect_timeout
        self._is_alive = is_alive
        self._console_tail = console_tail
        self._closed = threading.Event()
        self._active: list[socket.socket] = []
        with contextlib.suppress(FileNotFoundError):
            bridge_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _umask_lock:  # umask is process-wide: never let the socket exist group/world-open
            old = os.umask(0o177)
            try:
                self.listener.bind(str(bridge_path))
            finally:
                os.umask(old)
        os.chmod(bridge_path, 0o600)
        self.listener.listen(4)
        self.target = f"unix:{bridge_path}"
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="agent-bridge")
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            pending, self._pending = self._pending, None
            if pending is None:
                try:
                    pending = open_port(
                        self.port_path,
                        deadline=time.monotonic() + self._reconnect_timeout,
                        is_alive=self._is_alive,
                        console_tail=self._console_tail,
                    )
                except (GuestError, OSError) as exc:
                    self.last_error = str(exc)
                    client.close()  # gRPC sees UNAVAILABLE; the client maps it to GuestError
                    continue
            port_sock, leftover = pending
            self._active = [client, port_sock]
            try:
                _relay(client, port_sock, leftover)
            except OSError as exc:  # one broken connection must not end the bridge
                self.last_error = f"bridge connection failed: {exc}"
            finally:
                self._active = []
                client.close()
                port_sock.close()

    def close(self) -> None:
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


def connect(
    box_dir: Path,
    *,
    kind: str = "virtio-serial",
    socket_path: Path | None = None,
    timeout: float = 60.0,
    is_alive: Callable[[], bool] = lambda: True,
    console_tail: Callable[[], str] = lambda: "",
) -> Transport:
    """Wait for the agent (READY, racing VM death and the timeout) and return a transport."""
    box_dir = Path(box_dir)
    if kind == "virtio-serial":
        port_path = Path(socket_path) if socket_path else box_dir / PORT_NAME
        first = open_port(
            port_path,
            deadline=time.monotonic() + timeout,
            is_alive=is_alive,
            console_tail=console_tail,
        )
        return SerialBridge(
            port_path,
            box_dir / BRIDGE_NAME,
            first,
            reconnect_timeout=min(timeout, 30.0),
            is_alive=is_alive,
            console_tail=console_tail,
        )
    if kind in ("stream", "vsock-stream"):
        if socket_path is None:
            raise GuestError(f"channel kind {kind!r} needs socket_path (the backend's socket)")
        return DirectStream(Path(socket_path))
    raise GuestError(f"unknown agent channel kind {kind!r}; expected one of {KINDS}")
