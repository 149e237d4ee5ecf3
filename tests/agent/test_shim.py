"""The per-box agent shim: many host clients (threads and processes) share one serial port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.channel import shimctl
from boxlite_core.channel.client import AgentClient
from boxlite_core.errors import GuestError
from boxlite_core.vmm.procstat import alive, start_time
from boxlite_testing.orphans import naming

REPO = Path(__file__).resolve().parents[2]


def _connect(agent, **kw) -> AgentClient:
    return AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail, **kw
    )


def _shim_pids(box_dir: Path) -> list[int]:
    """Every running shim process serving box_dir: its argv names the box, or (a standby
    shim, shimctl.warm_shim) it holds a socket bound in the box directory."""
    return sorted(pid for pid, text in naming(box_dir, box_dir.name)
                  if "boxlite_core.channel.shim" in text and alive(pid, None))


def _wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid, None):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def ready_agent(agent_factory, busybox_root):
    agent = agent_factory()
    with _connect(agent) as c:
        c.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
    return agent


def test_two_clients_in_one_process_exec_concurrently(ready_agent):
    a, b = _connect(ready_agent), _connect(ready_agent)
    try:
        assert a._transport.pid == b._transport.pid  # one shim
        assert _shim_pids(ready_agent.box_dir) == [a._transport.pid]
        results: dict[str, list] = {"a": [], "b": []}

        def work(name: str, client: AgentClient) -> None:
            for i in range(10):
                code, _sig, _to, out, err = client.run(
                    ["sh", "-c", f"echo {name}-{i}; echo {name}-err-{i} >&2"]
                )
                results[name].append((code, out, err))

        threads = [threading.Thread(target=work, args=(n, c)) for n, c in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for name in ("a", "b"):
            assert results[name] == [
                (0, f"{name}-{i}\n".encode(), f"{name}-err-{i}\n".encode()) for i in range(10)
            ]
    finally:
        a.close()
        b.close()


def test_client_in_another_process_while_this_one_holds_the_box(ready_agent):
    mine = _connect(ready_agent)
    script = textwrap.dedent(
        f"""
        from boxlite_core.channel.client import AgentClient
        c = AgentClient.connect({str(ready_agent.box_dir)!r}, timeout=30)
        outs = [c.run(["echo", f"other-{{i}}"])[3].decode() for i in range(10)]
        print("".join(outs), end="")
        """
    )
    try:
        held = mine.exec(["sh", "-c", "sleep 1; echo mine-done"])
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        mine_outs = [mine.run(["echo", f"mine-{i}"])[3] for i in range(10)]
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out == "".join(f"other-{i}\n" for i in range(10))
        assert mine_outs == [f"mine-{i}\n".encode() for i in range(10)]
        assert b"".join(d for _, d in held.events()) == b"mine-done\n"
        assert held.wait().exit_code == 0
        assert len(_shim_pids(ready_agent.box_dir)) == 1
    finally:
        mine.close()


def test_long_exec_in_one_client_while_another_runs_short_ones(ready_agent):
    a, b = _connect(ready_agent), _connect(ready_agent)
    try:
        long = a.exec(
            ["sh", "-c", "i=0; while [ $i -lt 30 ]; do echo tick$i; i=$((i+1)); sleep 0.05; done"]
        )
        shorts = [b.run(["echo", str(i)]) for i in range(20)]
        assert [(s[0], s[3]) for s in shorts] == [(0, f"{i}\n".encode()) for i in range(20)]
        out = b"".join(d for _, d in long.events())
        assert out == b"".join(f"tick{i}\n".encode() for i in range(30))
        assert long.wait().exit_code == 0
    finally:
        a.close()
        b.close()


def test_closing_one_client_leaves_the_shim_and_others_working(ready_agent):
    a, b = _connect(ready_agent), _connect(ready_agent)
    pid = a._transport.pid
    running = b.exec(["sh", "-c", "sleep 0.5; echo still-here"])
    a.close()
    assert b.run(["echo", "after"])[3] == b"after\n"
    assert b"".join(d for _, d in running.events()) == b"still-here\n"
    b.close()
    assert shimctl.live_shim(ready_agent.box_dir)["pid"] == pid  # outlives its clients
    with _connect(ready_agent) as c:
        assert c._transport.pid == pid


def test_killed_shim_is_replaced_and_the_agent_says_ready_again(ready_agent):
    a = _connect(ready_agent)
    old = a._transport.pid
    os.kill(old, signal.SIGKILL)
    assert _wait_gone(old, 5)
    b = _connect(ready_agent)  # stale shim.json: a new shim, a new port connection, READY
    try:
        assert b._transport.pid != old
        assert b.run(["echo", "new shim"])[3] == b"new shim\n"
        assert b.ping()["initialized"] is True  # the same agent, still initialised
        # The older client dials the same socket path, now served by the new shim.
        assert a.run(["echo", "old client"])[3] == b"old client\n"
        log = (ready_agent.box_dir / "shim.log").read_text()
        assert log.count("READY on") == 2
    finally:
        a.close()
        b.close()


def test_racing_connects_start_one_shim(agent_factory):
    agent = agent_factory()
    clients: list[AgentClient] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            clients.append(_connect(agent))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors
        assert len({c._transport.pid for c in clients}) == 1
        assert len(_shim_pids(agent.box_dir)) == 1
    finally:
        for c in clients:
            c.close()


def test_agent_death_fails_connect_quickly_with_console_tail(ready_agent):
    a = _connect(ready_agent)
    pid = a._transport.pid
    a.close()
    ready_agent.proc.kill()
    ready_agent.proc.wait()
    assert _wait_gone(pid, 5), "the shim must exit once the port is gone"
    assert not (ready_agent.box_dir / "shim.json").exists()
    assert not (ready_agent.box_dir / "agent.grpc.sock").exists()
    start = time.monotonic()
    with pytest.raises(GuestError, match="VM stopped") as info:
        _connect(ready_agent)
    assert time.monotonic() - start < 3
    assert "guest console" in str(info.value)
    assert ready_agent.console_tail().strip().splitlines()[-1] in str(info.value)
    assert _shim_pids(ready_agent.box_dir) == []  # the one it started for the dead VM is gone


def test_shim_dying_before_serving_reports_its_log(agent_factory):
    agent = agent_factory()
    (agent.box_dir / "agent.grpc.sock").mkdir()  # the shim cannot replace it
    with pytest.raises(GuestError, match=r"agent shim .* exited with status 1") as info:
        _connect(agent)
    assert "could not start" in str(info.value)


def test_stop_shim_ends_it_and_removes_its_files(agent_factory):
    agent = agent_factory()
    c = _connect(agent)
    pid = c._transport.pid
    info = json.loads((agent.box_dir / "shim.json").read_text())
    assert info["pid"] == pid and info["start_time"] == start_time(pid)
    assert shimctl.stop_shim(agent.box_dir) is True
    assert _wait_gone(pid, 1)
    for name in ("shim.json", "agent.grpc.sock", "agent.bridge.sock"):
        assert not (agent.box_dir / name).exists()
    assert shimctl.stop_shim(agent.box_dir) is False
    with pytest.raises(GuestError):
        c.ping()
    c.close()
