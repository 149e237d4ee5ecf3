"""The READY-but-no-answer stall (notes/agent-stall.md), reproduced natively.

Under TCG load the guest answers the host's HTTP/2 preface slowly. The shim's gRPC channel
used to give each connection attempt ~100 ms (``grpc.min_reconnect_backoff_ms`` is gRPC's
*minimum connect timeout*), so it dropped the port session again and again, and each drop
raced the guest's writes; in QEMU 7.2 such a race can leave the virtio-serial port throttled,
so the guest's next READY never reaches the host. Here a real agent runs behind a small
relay standing in for QEMU's chardev socket: it adds latency to the guest's bytes, counts
host attaches, and can withhold a chosen attach's bytes the way a wedged port does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from boxlite_core.channel.client import AgentClient
from boxlite_core.proto.wire import READY


class ChardevStandIn:
    """Listens where QEMU's chardev would; each host connection becomes a fresh connection to
    the native agent's port socket (the agent resets its side per connection, like a guest
    seeing host_connected drop and rise)."""

    def __init__(self, path: Path, agent_port: Path, *, latency: float = 0.0) -> None:
        self.path = path
        self.agent_port = agent_port
        self.latency = latency
        self.attaches = 0
        self.wedge: set[int] = set()  # attach numbers whose guest bytes are withheld
        self._live: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                host, _ = self.listener.accept()
            except OSError:
                return
            guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                guest.connect(str(self.agent_port))
            except OSError:  # the agent is gone (test teardown)
                host.close()
                guest.close()
                continue
            with self._lock:
                self.attaches += 1
                number = self.attaches
                self._live = [host, guest]
            spoke: list[float] = []  # when the host's first bytes (its preface) arrived
            threading.Thread(
                target=self._pump, args=(host, guest, spoke, None, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump,
                args=(guest, host, None, spoke, number in self.wedge),
                daemon=True,
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        mark: list[float] | None,
        after: list[float] | None,
        withhold: bool,
    ) -> None:
        """Copy src → dst. Host → guest: note when the host first spoke (`mark`). Guest →
        host: READY passes at once; later bytes (the server's HTTP/2 answer) arrive no sooner
        than `latency` after the host spoke, as from a guest slow to answer the preface.
        withhold: deliver nothing at all (a wedged port) until the host hangs up."""
        pending: list[bytes] = []
        head = b""
        src.settimeout(0.01)
        try:
            while True:
                try:
                    data = src.recv(65536)
                    if not data:
                        break
                    if mark is not None and not mark:
                        mark.append(time.monotonic())
                    if after is not None and len(head) < len(READY):
                        take = len(READY) - len(head)
                        head += data[:take]
                        if not withhold:
                            dst.sendall(data[:take])
                        data = data[take:]
                    if data and not withhold:
                        pending.append(data)
                except TimeoutError:
                    pass
                now = time.monotonic()
                while pending and (after is None or (after and now >= after[0] + self.latency)):
                    dst.sendall(pending.pop(0))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_current(self) -> None:
        """Hang up the live session, as when the host side of the port goes away."""
        with self._lock:
            for s in self._live:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.drop_current()


def _wait_port(agent) -> None:
    end = time.monotonic() + 30
    while not agent.port.exists():
        assert time.monotonic() < end, agent.console_tail()
        time.sleep(0.05)


def _connect(agent, chardev: ChardevStandIn) -> AgentClient:
    return AgentClient.connect(
        agent.box_dir,
        socket_path=chardev.path,
        timeout=30,
        is_alive=agent.is_alive,
        console_tail=agent.console_tail,
    )


def test_slow_guest_handshake_keeps_one_port_session(agent_factory):
    """A guest that needs 0.4 s to answer the preface must get one session, not a storm of
    aborted ones (each re-attach is a chance to wedge a real virtio-serial port)."""
    agent = agent_factory()
    _wait_port(agent)
    chardev = ChardevStandIn(agent.box_dir / "chardev.sock", agent.port, latency=0.4)
    try:
        with _connect(agent, chardev) as client:
            for _ in range(3):
                client.ping()
        assert chardev.attaches == 1, (agent.box_dir / "shim.log").read_text()
    finally:
        chardev.close()


def test_wedged_reattach_is_retried_quickly(agent_factory):
    """The port session ends; the next attach never delivers READY (QEMU's port stayed
    throttled). The shim must drop that attach and try again within seconds, not wait out
    its 30 s READY timeout while every host call hangs."""
    agent = agent_factory()
    _wait_port(agent)
    chardev = ChardevStandIn(agent.box_dir / "chardev.sock", agent.port)
    chardev.wedge = {2}
    try:
        with _connect(agent, chardev) as client:
            client.ping()
            assert chardev.attaches == 1
            chardev.drop_current()
            started = time.monotonic()
            client.ping()  # waits for the shim's re-attach (wait_for_ready), 10 s deadline
            elapsed = time.monotonic() - started
        log = (agent.box_dir / "shim.log").read_text()
        assert chardev.attaches >= 3, log
        assert elapsed < 8, f"{elapsed:.1f}s\n{log}"
        assert "no READY" in log, log
    finally:
        chardev.close()


def test_a_call_right_after_the_port_session_ends_is_answered(agent_factory):
    """The port session ends and the host calls at once, before the shim's gRPC channel has
    noticed: a call that changes nothing (Ping) is sent again on the new session, not failed
    with "Stream removed" (CI saw that: the call went into the dead connection)."""
    agent = agent_factory()
    _wait_port(agent)
    chardev = ChardevStandIn(agent.box_dir / "chardev.sock", agent.port)
    try:
        with _connect(agent, chardev) as client:
            for round_ in range(12):
                client.ping()
                chardev.drop_current()
                client.ping()
                assert chardev.attaches == round_ + 2
    finally:
        chardev.close()
