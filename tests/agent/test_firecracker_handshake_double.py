"""The Firecracker hybrid-vsock handshake, against a fake hybrid-vsock unix socket.

Firecracker (docs/vsock.md) serves the guest's vsock device as a unix socket on the host: a
host connection must first write ``CONNECT <port>\\n`` and read ``OK <host_port>\\n``, and
only then carries the guest's stream. The double below is a real socket server in a thread
that speaks exactly that, then either echoes or relays to the real agent (run natively, its
vsock stand-in socket playing the guest's vsock port), so the host's handshake, its bounds and
its error messages, and gRPC through the relay, are all tested without a VM.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.channel import transport
from boxlite_core.channel.client import AgentClient
from boxlite_core.channel.stream import HandshakeRelay, dial
from boxlite_core.errors import GuestError
from boxlite_core.vmm.spec import ChannelKind, Handshake
from boxlite_testing.serial_port_double import pump

PORT = 1024


class FakeHybridVsock:
    """A Firecracker-style hybrid vsock socket. ``mode``: "ok" (answer OK, then echo or relay
    to ``guest``), "close" (hang up after CONNECT: nothing listens on that guest port),
    "garbage" (answer something else), "silent" (never answer)."""

    def __init__(self, path: Path, mode: str = "ok", guest: Path | None = None) -> None:
        self.path = path
        self.mode = mode
        self.guest = guest
        self.requests: list[bytes] = []
        self._conns: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            byte = conn.recv(1)
            if not byte:
                conn.close()
                return
            line += byte
        self.requests.append(line)
        if self.mode == "close":
            conn.close()
            return
        if self.mode == "garbage":
            conn.sendall(b"NOPE connection refused\n")
            return
        if self.mode == "silent":
            return  # hold the connection open, answer nothing
        if self.guest is None:
            # the answer and the guest's first bytes in one segment: the host must not eat them
            conn.sendall(b"OK 1073741824\nhello ")
            while data := conn.recv(4096):
                conn.sendall(data)
            conn.close()
            return
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.connect(str(self.guest))
        conn.sendall(b"OK 1073741824\n")
        _pipe_both(conn, guest)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def _pipe_both(a: socket.socket, b: socket.socket) -> None:
    threading.Thread(target=pump, args=(b, a), daemon=True).start()
    pump(a, b)


@pytest.fixture
def fake(tmp_path: Path):
    made: list[FakeHybridVsock] = []

    def make(mode: str = "ok", guest: Path | None = None) -> FakeHybridVsock:
        f = FakeHybridVsock(tmp_path / f"fc-{len(made)}.vsock", mode, guest)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_ok_then_the_stream_is_the_guests(fake) -> None:
    server = fake("ok")
    sock = dial(server.path, handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=5)
    try:
        sock.sendall(b"world")
        got = b""
        while len(got) < len(b"hello world"):
            got += sock.recv(64)
        assert got == b"hello world"  # bytes after "OK <n>\n" belong to the guest, in order
    finally:
        sock.close()
    assert server.requests == [f"CONNECT {PORT}\n".encode()]


def test_no_handshake_sends_nothing_first(fake) -> None:
    server = fake("silent")
    sock = dial(server.path, handshake=Handshake.NONE, vsock_port=PORT, timeout=5)
    sock.sendall(b"CONNECT-free\n")
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()
    assert server.requests == [b"CONNECT-free\n"]


def test_refused_when_the_vmm_hangs_up(fake) -> None:
    server = fake("close")
    with pytest.raises(GuestError, match=f"closed the connection.*CONNECT {PORT}") as info:
        dial(server.path, handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=5)
    assert str(server.path) in str(info.value)


def test_refused_when_the_vmm_answers_something_else(fake) -> None:
    server = fake("garbage")
    with pytest.raises(GuestError, match="NOPE connection refused") as info:
        dial(server.path, handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=5)
    message = str(info.value)
    assert str(server.path) in message and "'OK <port>'" in message


def test_missing_socket_names_it(tmp_path: Path) -> None:
    path = tmp_path / "never.vsock"
    with pytest.raises(GuestError, match="refuses connections") as info:
        dial(path, handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=5)
    assert str(path) in str(info.value)


def test_timeout_is_bounded_and_says_what_it_awaited(fake) -> None:
    server = fake("silent")
    started = time.monotonic()
    with pytest.raises(GuestError, match=r"timed out after 0\.5s waiting for 'OK <port>'") as info:
        dial(server.path, handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=0.5)
    assert time.monotonic() - started < 3
    assert str(server.path) in str(info.value)


def test_connect_picks_the_relay_for_the_firecracker_handshake(fake, tmp_path: Path) -> None:
    server = fake("ok")
    t = transport.connect(
        tmp_path, kind=ChannelKind.VSOCK, socket_path=server.path,
        handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT,
    )
    try:
        assert isinstance(t, HandshakeRelay)
        relay_path = Path(t.target.removeprefix("unix:"))
        assert relay_path.parent == tmp_path and relay_path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(relay_path))
            sock.sendall(b"x")
            got = b""
            while len(got) < len(b"hello x"):
                got += sock.recv(64)
            assert got == b"hello x"
    finally:
        t.close()
    assert not relay_path.exists()


def test_relay_keeps_the_refusal_for_the_error_message(fake, tmp_path: Path) -> None:
    server = fake("close")
    relay = HandshakeRelay(
        server.path, tmp_path / "r.sock", handshake=Handshake.FIRECRACKER_CONNECT,
        vsock_port=PORT, timeout=2,
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(tmp_path / "r.sock"))
            assert sock.recv(1) == b""  # closed: gRPC would see UNAVAILABLE and retry
        deadline = time.monotonic() + 5
        while relay.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.last_error and str(server.path) in relay.last_error
    finally:
        relay.close()


def test_grpc_to_the_real_agent_through_the_handshake(fake, agent_factory, busybox_root) -> None:
    """The whole host path: AgentClient → handshake relay → fake Firecracker socket → the
    agent's vsock listener (natively a unix socket) → gRPC server."""
    agent = agent_factory(serial=False, vsock_listen=True)
    deadline = time.monotonic() + 30
    while not agent.vsock.exists():
        assert agent.is_alive(), agent.console_tail()
        assert time.monotonic() < deadline, agent.console_tail()
        time.sleep(0.05)
    server = fake("ok", guest=agent.vsock)
    with AgentClient.connect(
        agent.box_dir, kind=ChannelKind.VSOCK, socket_path=server.path,
        handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=30,
        is_alive=agent.is_alive, console_tail=agent.console_tail,
    ) as client:
        client.init({"share": {"tag": str(busybox_root), "fstype": "bind"}, "hostname": "fc"})
        code, _sig, _timed_out, out, _err = client.run(["sh", "-c", "hostname; exit 4"])
        assert (code, out) == (4, b"fc\n")
    assert server.requests and all(r == f"CONNECT {PORT}\n".encode() for r in server.requests)
    assert not list(agent.box_dir.glob("agent.hs.*.sock"))  # the relay cleaned up


def test_grpc_reports_the_refusal_when_nothing_ever_listens(fake, tmp_path: Path) -> None:
    server = fake("close")
    with pytest.raises(GuestError, match=f"did not answer a Ping.*CONNECT {PORT}"):
        AgentClient.connect(
            tmp_path, kind=ChannelKind.VSOCK, socket_path=server.path,
            handshake=Handshake.FIRECRACKER_CONNECT, vsock_port=PORT, timeout=2,
        )
    assert not list(tmp_path.glob("agent.hs.*.sock"))
