"""The shim sends a call that changes nothing again when the guest channel failed it
UNAVAILABLE, and never sends again one that does something.

The agent here is a test double (a gRPC server of ours that fails on cue), behind the real
per-box shim and host client, through a stand-in of QEMU's serial chardev. CI once saw a Ping
go into a port session that had just ended ("Stream removed": sendmsg EPIPE) and fail the
caller, though nothing had reached the guest; test_port_stall tries that race for real.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.channel.shimctl import stop_shim
from boxlite_core.errors import GuestError
from boxlite_core.proto import agent_pb2 as pb
from boxlite_core.proto import agent_pb2_grpc as rpc
from boxlite_testing.serial_port_double import serial_port_double


class FlakyAgentDouble(rpc.GuestServicer, rpc.ExecutionServicer):
    """Fails the calls numbered in ``fail`` (per method, from 1) with UNAVAILABLE."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
            number = self.calls[method]
        if number in self.fail.get(method, ()):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method} #{number}: on cue")

    def Ping(self, request, context):
        self._count("Ping", context)
        return pb.PingReply(version="flaky-double")

    def Exec(self, request, context):
        self._count("Exec", context)
        return pb.ExecReply(exec_id="e1", pid=1)


@contextlib.contextmanager
def flaky_agent(tmp_path: Path) -> Iterator[tuple[FlakyAgentDouble, AgentClient]]:
    double = FlakyAgentDouble()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    rpc.add_GuestServicer_to_server(double, server)
    rpc.add_ExecutionServicer_to_server(double, server)
    grpc_sock = tmp_path / "flaky.sock"
    assert server.add_insecure_port(f"unix:{grpc_sock}")
    server.start()
    try:
        with serial_port_double(tmp_path / "agent.port", grpc_sock):
            client = AgentClient.connect(tmp_path, kind="virtio-serial", timeout=30)
            try:
                yield double, client
            finally:
                client.close()
                stop_shim(tmp_path)
    finally:
        server.stop(grace=None)


def test_a_ping_that_fails_unavailable_is_sent_again(tmp_path: Path) -> None:
    with flaky_agent(tmp_path) as (double, client):
        before = double.calls["Ping"]
        double.fail["Ping"] = {before + 1, before + 2}
        assert client.ping()["version"] == "flaky-double"
        assert double.calls["Ping"] == before + 3


def test_a_ping_is_not_sent_forever(tmp_path: Path) -> None:
    with flaky_agent(tmp_path) as (double, client):
        before = double.calls["Ping"]
        double.fail["Ping"] = set(range(before + 1, before + 100))
        with pytest.raises(GuestError, match="on cue"):
            client.ping()
        assert double.calls["Ping"] == before + 3  # maxAttempts


def test_an_exec_is_never_sent_twice(tmp_path: Path) -> None:
    with flaky_agent(tmp_path) as (double, client):
        double.fail["Exec"] = {1}
        with pytest.raises(GuestError, match="on cue"):
            client.exec(["true"])
        assert double.calls["Exec"] == 1, "a program must not be started twice"
