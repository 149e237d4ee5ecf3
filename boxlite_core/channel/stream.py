"""vsock channels: every dial on the backend's socket is its own stream to the guest agent.

Why its own module: a vsock channel needs no shim (each connect is a fresh guest stream, so
any number of host processes dial at once, and there is no READY line: the client's first
Ping is the readiness check), but it may need a handshake first.

* Handshake.NONE (libkrun, hvf): gRPC dials the backend's socket directly (:class:`DirectStream`).
* Handshake.FIRECRACKER_CONNECT (Firecracker hybrid vsock, its docs/vsock.md): the host must
  write ``CONNECT <port>\\n`` on each new connection and read ``OK <host_port>\\n`` before the
  stream is the guest's. grpc cannot say that itself, so :class:`HandshakeRelay` listens on a
  private socket in the box directory (mode 0600, named for this process) and, for every
  connection gRPC opens, dials the backend's socket, does the handshake (:func:`dial`) and
  relays bytes. A refused handshake closes that gRPC connection (UNAVAILABLE: the client
  retries until its deadline) and is kept in ``last_error`` for the final message.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

from ..errors import GuestError
from ..vmm.spec import Handshake
from .bridge import listen_private, relay
from .target import Transport

#: longest answer line accepted to a CONNECT ("OK 4294967295\n" is 14 bytes)
MAX_ANSWER = 64
_OK = re.compile(rb"OK [0-9]+\n")


class DirectStream(Transport):
    """gRPC dials the backend's socket itself: each connect is a fresh guest stream."""

    def __init__(self, path: Path) -> None:
        self.target = f"unix:{path}"


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """Bytes up to and including the first newline, read one at a time: whatever follows the
    answer is the agent's and must stay in the socket for the relay."""
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_ANSWER:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def dial(path: Path, *, handshake: Handshake, vsock_port: int, timeout: float) -> socket.socket:
    """A connected stream to the guest agent through the backend's socket at ``path``.

    For FIRECRACKER_CONNECT, sends ``CONNECT <vsock_port>\\n`` and requires ``OK <n>\\n``
    within ``timeout`` seconds; the returned socket then carries the agent's bytes only.

    Raises:
        GuestError: the socket is missing or refuses the connect, the peer closed or answered
            something other than ``OK <n>`` (naming the socket and the answer), or no answer
            came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, timeout))
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise GuestError(
                f"the agent socket {path} refuses connections ({exc.strerror}); check that the "
                "VM backend created it and the VM is running"
            ) from None
        if handshake is Handshake.FIRECRACKER_CONNECT:
            awaited = f"'OK <port>' after 'CONNECT {vsock_port}' on the hybrid vsock socket {path}"
            sock.sendall(f"CONNECT {vsock_port}\n".encode())
            try:
                answer = _read_line(sock, deadline)
            except TimeoutError:
                raise GuestError(
                    f"timed out after {timeout:.1f}s waiting for {awaited}"
                ) from None
            if not answer:
                raise GuestError(
                    f"the VMM closed the connection instead of answering {awaited}: nothing "
                    f"listens on guest vsock port {vsock_port} (yet)"
                )
            if not _OK.fullmatch(answer):
                raise GuestError(
                    f"the VMM answered {answer!r} while waiting for {awaited}; a hybrid vsock "
                    "socket answers 'OK <host port>'"
                )
        sock.settimeout(None)
        return sock
    except GuestError:
        sock.close()
        raise
    except OSError as exc:  # a reset mid-handshake, a connect that timed out, ...
        sock.close()
        raise GuestError(f"the agent socket {path} failed during the handshake: {exc}") from None
    except BaseException:
        sock.close()
        raise


class HandshakeRelay(Transport):
    """A private listening socket whose every connection is relayed, after :func:`dial`'s
    handshake, to the backend's socket. One per host process (its pid is in the name)."""

    def __init__(
        self,
        socket_path: Path,
        relay_path: Path,
        *,
        handshake: Handshake,
        vsock_port: int,
        timeout: float = 5.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.relay_path = Path(relay_path)
        self._handshake = handshake
        self._vsock_port = vsock_port
        self._timeout = timeout
        self._closed = threading.Event()
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            self.relay_path.unlink()
        self.listener = listen_private(self.relay_path, backlog=16)
        self.target = f"unix:{self.relay_path}"
        self._thread = threading.Thread(target=self._serve, daemon=True, name="agent-handshake")
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._one, args=(client,), daemon=True, name="agent-handshake-relay"
            ).start()

    def _one(self, client: socket.socket) -> None:
        try:
            upstream = dial(
                self.socket_path,
                handshake=self._handshake,
                vsock_port=self._vsock_port,
                timeout=self._timeout,
            )
        except GuestError as exc:
            self.last_error = str(exc)
            client.close()  # gRPC sees UNAVAILABLE; the client retries or reports last_error
            return
        with self._lock:
            if self._closed.is_set():  # closed while this handshake ran
                client.close()
                upstream.close()
                return
            self._active.update((client, upstream))
        try:
            relay(client, upstream, b"")
        finally:
            with self._lock:
                self._active.difference_update((client, upstream))
            client.close()
            upstream.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for s in list(self._active):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.relay_path.unlink()
        self._thread.join(timeout=2)
