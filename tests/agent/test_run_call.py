"""``AgentClient.run`` without input: one Run call (start, output, status in one stream).

Against the real agent (native, chrooting into busybox) the results must be what Exec +
Output + Wait gave: both streams apart, large output whole, the exit code or the signal, a
timeout, an unknown program named. Against an agent older than Run (a test double: a gRPC
server of ours that only has the three calls, as an agent in a snapshot saved by an older
boxlite) the client falls back to the three, once, and keeps using them.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.channel.target import Transport
from boxlite_core.errors import GuestError
from boxlite_core.proto import agent_pb2 as pb
from boxlite_core.proto import agent_pb2_grpc as rpc


@pytest.fixture
def ready(agent_factory, busybox_root):
    agent = agent_factory()
    client = AgentClient.connect(agent.box_dir, timeout=30, is_alive=agent.is_alive,
                                 console_tail=agent.console_tail)
    client.init({"share": {"tag": str(busybox_root), "fstype": "bind"}})
    yield client
    client.close()


def test_run_gives_what_exec_output_and_wait_gave(ready: AgentClient):
    script = "echo out; echo err >&2; head -c 3000000 /dev/zero | tr '\\0' x; exit 7"
    code, sig, timed_out, out, err = ready.run(["sh", "-c", script])
    assert (code, sig, timed_out, err) == (7, None, False, b"err\n")
    assert out == b"out\n" + b"x" * 3_000_000
    assert ready._has_run  # the agent has Run: used, kept
    # the same command through the three calls
    session = ready.exec(["sh", "-c", script])
    events = list(session.events())
    assert b"".join(d for s, d in events if s == "stdout") == out
    assert session.wait().exit_code == 7


def test_run_reports_signals_timeouts_and_unknown_programs(ready: AgentClient):
    assert ready.run(["sh", "-c", "kill -9 $$"])[:3] == (None, 9, False)
    code, sig, timed_out, _out, _err = ready.run(["sleep", "30"], timeout=0.5)
    assert timed_out and (code, sig) == (None, 15)
    with pytest.raises(GuestError, match="cannot run 'no-such-program'"):
        ready.run(["no-such-program"])
    assert ready.run(["true"])[0] == 0  # the failures left the client usable


def test_run_refuses_stdin(ready: AgentClient):
    stub = rpc.ExecutionStub(ready._channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Run(pb.ExecRequest(args=["cat"], stdin=True), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no stdin" in caught.value.details()


class OldAgentDouble(rpc.ExecutionServicer):
    """An agent from before Run: Exec, Output and Wait only (Run is UNIMPLEMENTED, as the
    generated base class answers)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1

    def Run(self, request, context):
        self._count("Run")
        return super().Run(request, context)

    def Exec(self, request, context):
        self._count("Exec")
        return pb.ExecReply(exec_id=f"e{self.calls['Exec']}", pid=2)

    def Output(self, request, context):
        self._count("Output")
        yield pb.OutputChunk(stream=pb.OutputChunk.STDOUT, data=b"old agent\n")

    def Wait(self, request, context):
        self._count("Wait")
        return pb.WaitReply(has_exit_code=True, exit_code=3)


class _Socket(Transport):
    def __init__(self, path: Path) -> None:
        self.target = f"unix:{path}"


def test_an_agent_without_run_gets_the_three_calls(tmp_path: Path):
    double = OldAgentDouble()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    rpc.add_ExecutionServicer_to_server(double, server)
    sock = tmp_path / "old-agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    client = AgentClient(_Socket(sock), is_alive=lambda: True, console_tail=lambda: "")
    try:
        for _ in range(2):
            assert client.run(["anything"]) == (3, None, False, b"old agent\n", b"")
        assert not client._has_run
        # asked once; then Exec + Output + Wait every time
        assert double.calls == {"Run": 1, "Exec": 2, "Output": 2, "Wait": 2}
    finally:
        client.close()
        server.stop(0)
