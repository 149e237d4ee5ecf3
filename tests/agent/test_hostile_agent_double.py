"""A replaced (hostile) guest agent cannot make the host allocate without bound.

The guest is root in its VM and can swap our agent for its own gRPC server. These tests stand
one in (a test double: a gRPC server of ours that answers with oversized messages) on both
channel kinds, behind the real host client and, for virtio-serial, the real per-box shim:
every reply larger than the host's bound fails the call with one clear GuestError instead of
being buffered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from boxlite_core.channel.client import AgentClient
from boxlite_core.channel.shimctl import stop_shim
from boxlite_core.channel.target import MAX_GUEST_MESSAGE
from boxlite_core.errors import GuestError
from boxlite_core.proto import agent_pb2 as pb
from boxlite_core.proto import agent_pb2_grpc as rpc
from boxlite_testing.serial_port_double import serial_port_double

OVERSIZED = MAX_GUEST_MESSAGE + 1024 * 1024


class OversizedGuestDouble(rpc.GuestServicer):
    def Ping(self, request, context):
        return pb.PingReply(version="hostile-double")

    def Probe(self, request, context):
        return pb.ProbeReply(hostname="x" * OVERSIZED)


class OversizedFilesDouble(rpc.FilesServicer):
    def Download(self, request, context):
        yield pb.DownloadChunk(data=b"\0" * 1024)  # an honest-looking start
        yield pb.DownloadChunk(data=b"\0" * OVERSIZED)


@contextlib.contextmanager
def hostile_server(path: Path) -> Iterator[None]:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", -1)],
    )
    rpc.add_GuestServicer_to_server(OversizedGuestDouble(), server)
    rpc.add_FilesServicer_to_server(OversizedFilesDouble(), server)
    assert server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield
    finally:
        server.stop(grace=None)


def _assert_bounded(client: AgentClient) -> None:
    with pytest.raises(GuestError, match="larger than 16 MiB during probe"):
        client.probe(["/"])
    with pytest.raises(GuestError, match="larger than 16 MiB during download"):
        b"".join(client.download_tar("/etc"))
    assert client.ping()["version"] == "hostile-double", "the channel must stay usable"


def test_oversized_replies_fail_cleanly_on_a_stream_channel(tmp_path: Path) -> None:
    sock = tmp_path / "agent.vsock"
    with hostile_server(sock):
        client = AgentClient.connect(tmp_path, kind="vsock", socket_path=sock, timeout=20)
        try:
            _assert_bounded(client)
        finally:
            client.close()


def test_oversized_replies_fail_cleanly_through_the_shim(tmp_path: Path) -> None:
    grpc_sock = tmp_path / "hostile.sock"
    with hostile_server(grpc_sock), serial_port_double(tmp_path / "agent.port", grpc_sock):
        client = AgentClient.connect(tmp_path, kind="virtio-serial", timeout=30)
        try:
            _assert_bounded(client)
        finally:
            client.close()
            stop_shim(tmp_path)
