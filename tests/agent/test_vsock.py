"""The agent's vsock channel (libkrun, hvf): no READY line, one gRPC stream per connection.

Natively a unix socket stands in for the AF_VSOCK port (``--vsock-listen``; the relay code is
the same), and the host side is the client's real ``kind="vsock"`` transport, exactly what
the libkrun/hvf backends use. A real AF_VSOCK round trip runs where the host kernel has
vsock loopback (VMADDR_CID_LOCAL).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.agent.vsock import cmdline_port
from boxlite_core.channel.client import AgentClient
from boxlite_testing.serial_port_double import pump


def _stream(agent, path=None, **kw) -> AgentClient:
    return AgentClient.connect(
        agent.box_dir,
        kind="vsock",
        socket_path=path or agent.vsock,
        timeout=30,
        is_alive=agent.is_alive,
        console_tail=agent.console_tail,
        **kw,
    )


def _wait_for(path, agent, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert agent.is_alive(), agent.console_tail()
        assert time.monotonic() < deadline, f"{path} never appeared: {agent.console_tail()}"
        time.sleep(0.05)


def test_cmdline_port_parsing():
    assert cmdline_port("console=hvc0 quiet boxlite.agent_vsock=1024 panic=-1") == 1024
    assert cmdline_port("boxlite.agent_vsock=1024 boxlite.agent_vsock=2000") == 2000
    assert cmdline_port("console=ttyS0 boxlite.agent_vsockx=5 boxlite.agent_vsock") is None
    with pytest.raises(ValueError, match=r"boxlite\.agent_vsock=abc"):
        cmdline_port("boxlite.agent_vsock=abc")


def test_vsock_only_agent_serves_stream_clients(agent_factory, busybox_root):
    agent = agent_factory(serial=False, vsock_listen=True)
    with _stream(agent) as c:
        c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}, "hostname": "vs"})
        code, _sig, _timed_out, out, err = c.run(["sh", "-c", "hostname; echo err >&2; exit 3"])
        assert (code, out, err) == (3, b"vs\n", b"err\n")
    assert os.stat(agent.vsock).st_mode & 0o777 == 0o600
    assert not agent.port.exists()


def test_no_ready_line_on_a_stream(agent_factory):
    agent = agent_factory(serial=False, vsock_listen=True)
    _wait_for(agent.vsock, agent)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(agent.vsock))
        raw.settimeout(1.0)
        try:
            first = raw.recv(64)
        except TimeoutError:
            first = b""
    # The gRPC server may send its HTTP/2 SETTINGS first, but never the serial READY line.
    assert not first.startswith(b"READY")


def test_concurrent_streams_are_independent(agent_factory, busybox_root):
    agent = agent_factory(serial=False, vsock_listen=True)
    first = _stream(agent)
    second = _stream(agent)
    try:
        first.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
        slow = first.exec(["sh", "-c", "sleep 0.5; echo slow"])
        assert second.run(["echo", "fast"])[3] == b"fast\n"
        # Closing one stream leaves the other (and the exec it started) intact.
        second.close()
        assert b"".join(d for _, d in slow.events()) == b"slow\n"
        assert slow.wait().exit_code == 0
        third = _stream(agent)
        assert third.ping()["initialized"] is True
        third.close()
    finally:
        first.close()
        second.close()


def test_serial_and_vsock_serve_together(agent_factory, busybox_root):
    agent = agent_factory(serial=True, vsock_listen=True)
    serial = AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail
    )
    try:
        serial.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
        with _stream(agent) as stream:
            assert stream.run(["echo", "via vsock"])[3] == b"via vsock\n"
            assert serial.run(["echo", "via serial"])[3] == b"via serial\n"
    finally:
        serial.close()


def test_no_channel_at_all_is_fatal(agent_factory):
    """No virtio-serial port and no vsock port: today's fatal error (exit 70 natively; the
    traceback naming the missing port goes to /dev/console, as in the guest)."""
    if any(
        name.read_text().strip() == "org.boxlite.agent"
        for name in Path("/sys/class/virtio-ports").glob("vport*/name")
    ):
        pytest.skip("this host has a real org.boxlite.agent virtio port")
    agent = agent_factory(serial=False)
    assert agent.proc.wait(timeout=30) == 70
    assert not agent.vsock.exists()


# --- real AF_VSOCK --------------------------------------------------------------------------


def _vsock_loopback_reason() -> str | None:
    """None when a local AF_VSOCK connect works (vsock_loopback / VMADDR_CID_LOCAL)."""
    if not hasattr(socket, "AF_VSOCK"):
        return "Python has no AF_VSOCK"
    port = random.randint(40000, 60000)
    try:
        server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        return f"no AF_VSOCK sockets in this kernel ({exc})"
    with server:
        try:
            server.bind((socket.VMADDR_CID_ANY, port))
            server.listen(1)
        except OSError as exc:
            return f"cannot listen on vsock port {port} ({exc})"
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
            client.settimeout(1.0)
            try:
                client.connect((1, port))  # VMADDR_CID_LOCAL
            except OSError as exc:
                return (
                    f"no vsock loopback: connect to CID 1 (VMADDR_CID_LOCAL) failed ({exc!r}); "
                    "needs the vsock_loopback module"
                )
    return None


class _VsockBridge:
    """What libkrun's krun_add_vsock_port2(listen=True) does: each connect on a unix socket
    becomes a new vsock stream to (CID, PORT), bytes copied both ways."""

    def __init__(self, path, cid: int, port: int) -> None:
        self.cid, self.port = cid, port
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            guest = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                guest.connect((self.cid, self.port))
            except OSError:
                conn.close()
                guest.close()
                continue
            for a, b in ((conn, guest), (guest, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def test_real_af_vsock_round_trip(agent_factory, busybox_root, tmp_path):
    reason = _vsock_loopback_reason()
    if reason:
        pytest.skip(reason)
    port = random.randint(40000, 60000)
    agent = agent_factory(serial=False, vsock_port=port)
    bridge = _VsockBridge(tmp_path / "krun.sock", 1, port)
    try:
        with _stream(agent, path=tmp_path / "krun.sock") as c:
            c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
            assert c.run(["echo", "over vsock"])[3] == b"over vsock\n"
    finally:
        bridge.close()
