"""Every call into an external program, QEMU's monitor and the agent is bounded in time, and the
error names what was waited for (finding 8: createXML hung for minutes).

Real parts: real `sleep` (and its child), a real unix socket that accepts and never greets as
QEMU's monitor, a real gRPC server on a unix socket whose Files service stalls (a double of a
stuck agent: the real agent needs a VM).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from boxlite_core import tools
from boxlite_core.errors import EngineError, GuestError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_tools_run_without_a_timeout_is_bounded_by_the_default(monkeypatch, tmp_path):
    """No caller can forget the bound: run() without timeout= uses BOXLITE_TOOL_TIMEOUT."""
    monkeypatch.setenv("BOXLITE_TOOL_TIMEOUT", "2")
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        # a shell whose child (the sleep) would keep the pipes open after the shell dies
        tools.run(["sh", "-c", f"sleep 100 & echo $! > {pidfile}; wait"])
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert "sh did not finish within 2 s and was killed" in msg, msg
    assert "BOXLITE_TOOL_TIMEOUT" in msg, msg
    child = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the program's child outlived the timeout"


@pytest.mark.timeout(60)
def test_tools_run_sleep_100_with_an_explicit_bound():
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"sleep \(a test nap\) did not finish within 1 s"):
        tools.run(["sleep", "100"], timeout=1, what="a test nap")
    assert time.monotonic() - t0 < 15


@pytest.fixture
def mute_socket(tmp_path: Path):
    """A unix socket that accepts and never says a word (no QMP greeting)."""
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(srv.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield path
    for conn in held:
        conn.close()
    srv.close()


@pytest.mark.timeout(60)
def test_qmp_against_a_socket_that_never_greets_fails_in_the_bound(mute_socket):
    pytest.importorskip("qemu.qmp")
    from boxlite_qemu.qmp import QmpError, qmp_command

    t0 = time.monotonic()
    with pytest.raises(QmpError) as err:
        qmp_command(mute_socket, "query-status", timeout=2)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert f"QMP monitor {mute_socket} did not greet within 2 s" in msg, msg
    assert "query-status" in msg and "BOXLITE_QMP_TIMEOUT" in msg, msg


class _StalledFilesDouble:
    """A Files service that accepts the call and never answers (a wedged agent)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Upload(self, request_iterator, context):
        self.release.wait(60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    def Download(self, request, context):
        self.release.wait(60)
        return iter(())


@pytest.fixture
def stalled_agent_double(tmp_path: Path):
    from boxlite_core.proto import agent_pb2_grpc as rpc

    servicer = _StalledFilesDouble()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_FilesServicer_to_server(servicer, server)
    sock = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    yield f"unix:{sock}"
    servicer.release.set()
    server.stop(0)


def _client(target: str):
    from boxlite_core.channel.client import AgentClient

    class _Transport:
        def __init__(self, target: str) -> None:
            self.target = target

        def close(self) -> None:
            pass

    return AgentClient(_Transport(target), is_alive=lambda: True,  # type: ignore[arg-type]
                       console_tail=lambda: "")


@pytest.mark.timeout(60)
def test_download_from_a_stalled_agent_double_fails_in_the_bound(stalled_agent_double,
                                                                  monkeypatch):
    monkeypatch.setenv("BOXLITE_AGENT_TRANSFER_TIMEOUT", "2")
    client = _client(stalled_agent_double)
    t0 = time.monotonic()
    with pytest.raises(GuestError) as err:
        list(client.download_tar("/etc"))
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "did not answer download of /etc (bound 2 s, BOXLITE_AGENT_TRANSFER_TIMEOUT)" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("what", "send"),
    [
        ("upload to /tmp", lambda client: client.upload_tar("/tmp", [b"x" * 1024])),
        ("copy to /tmp/x", lambda client: client.copy_in_tar("/tmp/x", b"fx", [b"x" * 1024])),
    ],
    ids=["raw-upload", "docker-cp-upload"],
)
def test_upload_to_a_stalled_agent_double_fails_in_the_bound(
    stalled_agent_double, monkeypatch, what, send
):
    monkeypatch.setenv("BOXLITE_AGENT_TRANSFER_TIMEOUT", "2")
    client = _client(stalled_agent_double)
    t0 = time.monotonic()
    with pytest.raises(GuestError, match=rf"did not answer {what} \(bound 2 s"):
        send(client)
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize(
    "name", ["BOXLITE_TOOL_TIMEOUT", "BOXLITE_AGENT_TRANSFER_TIMEOUT", "BOXLITE_BOOT_TIMEOUT",
             "BOXLITE_LIBVIRT_TIMEOUT", "BOXLITE_QMP_TIMEOUT"],
)
@pytest.mark.parametrize("value", ["ten", "-1", "0", "nan", "inf"])
def test_a_mistyped_bound_is_refused_by_name(monkeypatch, name: str, value: str) -> None:
    """A setting meant to lengthen a bound on a slow host must not be silently ignored."""
    from boxlite_core import tools
    from boxlite_core.channel import client
    from boxlite_core.errors import ConfigError
    from boxlite_core.runtime import pipeline
    from boxlite_qemu import libvirt_conn
    from boxlite_qemu.qmp import bound

    readers = {
        "BOXLITE_TOOL_TIMEOUT": tools.default_timeout,
        "BOXLITE_AGENT_TRANSFER_TIMEOUT": client.transfer_timeout,
        "BOXLITE_BOOT_TIMEOUT": pipeline.boot_timeout,
        "BOXLITE_LIBVIRT_TIMEOUT": libvirt_conn.call_timeout,
        "BOXLITE_QMP_TIMEOUT": lambda: bound(5.0),
    }
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}'"):
        readers[name]()
    monkeypatch.setenv(name, "7.5")
    assert readers[name]() == 7.5
