"""Connecting, re-attaching, volumes, VM death and shutdown (the agent runs natively)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.errors import GuestError


def _connect(agent, **kw) -> AgentClient:
    return AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail, **kw
    )


def test_bridge_socket_is_private(agent_factory):
    agent = agent_factory()
    with _connect(agent):
        mode = os.stat(agent.box_dir / "agent.grpc.sock").st_mode & 0o777
        assert mode == 0o600
        assert os.stat(agent.port).st_mode & 0o777 == 0o600


def test_reconnect_after_host_disconnects(agent_factory, busybox_root):
    agent = agent_factory()
    first = _connect(agent)
    first.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
    running = first.exec(["sh", "-c", "sleep 1; echo survived"])
    first.close()

    second = _connect(agent)
    try:
        assert second.ping()["initialized"] is True
        assert second.run(["echo", "again"])[3] == b"again\n"
        # The exec started by the first host process is still there, output buffered.
        sess = second.attach(running.exec_id)
        assert b"".join(d for _, d in sess.events()) == b"survived\n"
        assert sess.wait().exit_code == 0
    finally:
        second.close()
    third = _connect(agent)
    assert third.ping()["version"]
    third.close()


def test_volumes_bind_ro_and_rw(agent_factory, busybox_root, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "hello").write_text("from host\n")
    agent = agent_factory()
    with _connect(agent) as c:
        c.init(
            {
                "share": {"tag": str(busybox_root), "fstype": "bind"},
                "volumes": [
                    {"tag": str(ro), "fstype": "bind", "guest_path": "/mnt/ro", "read_only": True},
                    {"tag": str(rw), "fstype": "bind", "guest_path": "/mnt/rw"},
                ],
            }
        )
        assert c.run(["cat", "/mnt/ro/hello"])[3] == b"from host\n"
        code, _, _, _, err = c.run(["sh", "-c", "echo x > /mnt/ro/new"])
        assert code != 0 and b"Read-only" in err
        assert c.run(["sh", "-c", "echo y > /mnt/rw/new"])[0] == 0
        assert (rw / "new").read_text() == "y\n"
        mounts = {m["target"]: m for m in c.probe()["mounts"]}
        root = c.probe()["container_root"]
        assert mounts[f"{root}/mnt/ro"]["options"].split(",")[0] == "ro"


def test_init_errors_are_clear(agent_factory):
    agent = agent_factory()
    with _connect(agent) as c:
        with pytest.raises(GuestError, match="not initialised"):
            c.exec(["true"])
        with pytest.raises(GuestError, match="bad guest init config"):
            c.init({"nonsense": 1})
        with pytest.raises(GuestError, match="no virtio-blk disk with serial 'nope'"):
            c.init({"disk": {"serial": "nope"}})


def test_connect_fails_with_console_tail_when_vm_dies(tmp_path):
    # A "QEMU" that accepts but whose guest never says READY, and dies after 0.3 s.
    port = tmp_path / "agent.port"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(port))
    listener.listen(1)
    deadline = time.monotonic() + 0.3
    start = time.monotonic()
    with pytest.raises(GuestError, match="VM stopped") as info:
        AgentClient.connect(
            tmp_path,
            timeout=30,
            is_alive=lambda: time.monotonic() < deadline,
            console_tail=lambda: "Kernel panic - not syncing: boom",
        )
    assert "Kernel panic - not syncing: boom" in str(info.value)
    assert time.monotonic() - start < 5
    listener.close()


def test_connect_times_out_with_clear_error(tmp_path):
    port = tmp_path / "agent.port"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(port))
    listener.listen(1)
    with pytest.raises(GuestError, match="timed out waiting for the guest agent's READY"):
        AgentClient.connect(tmp_path, timeout=0.5, console_tail=lambda: "booting...")
    listener.close()


def test_vm_death_mid_exec_raises_not_hangs(agent_factory, busybox_root):
    agent = agent_factory()
    c = _connect(agent)
    c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
    session = c.exec(["sh", "-c", "echo started; sleep 60"])
    events = session.events()
    assert next(events) == ("stdout", b"started\n")
    threading.Timer(0.3, agent.proc.kill).start()
    start = time.monotonic()
    with pytest.raises(GuestError, match="the box's VM stopped during exec"):
        session.wait()
    assert time.monotonic() - start < 10
    with pytest.raises(GuestError, match="stopped during exec"):
        list(events)
    c.close()


def test_shutdown_stops_the_agent(agent_factory, busybox_root):
    agent = agent_factory()
    c = _connect(agent)
    c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
    c.exec(["sleep", "60"])
    c.shutdown()
    c.close()
    assert agent.proc.wait(timeout=10) == 0
    c.shutdown()  # again, with the "VM" gone: tolerated


def test_stream_kind_dials_socket_directly(agent_factory):
    agent = agent_factory()
    with _connect(agent) as c:  # brings the agent up; its gRPC socket is a "stream" endpoint
        c.ping()
    direct = AgentClient.connect(
        agent.box_dir, kind="stream", socket_path=agent.box_dir / "run" / "agent.sock", timeout=10
    )
    assert direct.ping()["version"]
    direct.close()
