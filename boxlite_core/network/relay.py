"""Per-box network relay: the host side of a box's network, as its own process.

The guest has no network device; its agent catches the container's TCP connections, DNS
queries and other UDP datagrams and offers each to this process over the agent channel (the
Network service in agent.proto). Here every one is judged by the box's policy
(``policy.Decider``): a query is answered by the host-side resolver, which only resolves
allowed names; an allowed connection is made from this process's own socket and its bytes are
relayed; a denied one is reset at once and logged with the reason (``BOXDIR/network.log``);
UDP flows live in ``udpflows``. Published ports (``-p``) listen here and dial into the box
through the same channel. Nothing changes the host's firewall or routes.

Why a process (like the agent shim and virtiofsd): a box started with ``run -d`` keeps its
network after the starting process exits. It is started and stopped with the box
(``relayctl``); it exits by itself once the box's agent socket is gone.

Run: ``python -m boxlite_core.network.relay --box-dir DIR`` (reads DIR/network.json, writes
DIR/netrelay.json {pid, start_time, ports} once it serves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import grpc

from ..agent.network import recv_batch
from ..channel.shimctl import SHIM_SOCK_NAME
from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as rpc
from ..vmm.procstat import start_time
from .policy import Decider, NetworkMode
from .ports import PortMapping
from .relayctl import CONFIG_NAME, NETWORK_LOG, RELAY_JSON, RelayConfig
from .resolver import Resolver
from .sniff import peek_names
from .udpflows import UdpFlows

#: seconds a connection from this host to an allowed destination may take
CONNECT_TIMEOUT = 10.0
#: what the relay reads of a connection to find a TLS SNI or HTTP Host before deciding
SNIFF_BYTES = 16 * 1024
SNIFF_SECONDS = 2.0
#: seconds the published-port dial into the box may take to say connected or refused
DIAL_TIMEOUT = 15.0
#: seconds without the agent socket after which the relay gives up (the box is gone)
GONE_AFTER = 10.0
_END = pb.NetFrame(reason="__end__")  # sentinel: the stream of frames to the guest ends


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer learns at once that it was refused."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Stream:
    """One bidi Relay/Dial call: frames to the guest go through a queue, frames from the
    guest are read on a thread into another (gRPC's iterator has no timeout of its own)."""

    def __init__(self, method, first: pb.NetFrame) -> None:
        self.outgoing: queue.Queue[pb.NetFrame] = queue.Queue()
        self.incoming: queue.Queue[pb.NetFrame | None] = queue.Queue()
        self.outgoing.put(first)
        self.call = method(self._frames())
        threading.Thread(target=self._read, daemon=True, name="net-read").start()

    def _frames(self) -> Iterator[pb.NetFrame]:
        while True:
            frame = self.outgoing.get()
            if frame is _END:
                return
            yield frame

    def _read(self) -> None:
        try:
            for frame in self.call:
                self.incoming.put(frame)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.incoming.put(pb.NetFrame(reset=True, reason=f"agent channel: {exc.code()}"))
        finally:
            self.incoming.put(None)

    def send(self, frame: pb.NetFrame) -> None:
        self.outgoing.put(frame)

    def end(self) -> None:
        self.outgoing.put(_END)

    def refuse(self, reason: str) -> None:
        self.send(pb.NetFrame(reset=True, reason=reason))
        self.end()

    def pump(self, sock: socket.socket) -> None:
        """Relay until both directions are done or one side resets; closes ``sock``."""

        def to_socket() -> None:
            try:
                while (frame := self.incoming.get()) is not None:
                    if frame.reset:
                        _reset(sock)
                        return
                    if frame.data:
                        sock.sendall(frame.data)
                    if frame.eof:
                        sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.send(pb.NetFrame(reset=True, reason=f"host socket: {exc.strerror}"))

        writer = threading.Thread(target=to_socket, daemon=True, name="net-write")
        writer.start()
        try:
            while True:
                try:
                    data = recv_batch(sock)
                except OSError as exc:
                    self.send(pb.NetFrame(reset=True, reason=f"host socket: {exc.strerror}"))
                    break
                if not data:
                    self.send(pb.NetFrame(eof=True))
                    break
                self.send(pb.NetFrame(data=data))
            writer.join()
        finally:
            self.end()
            with contextlib.suppress(OSError):
                sock.close()


class Relay:
    """The relay of one box: the events loop, the DNS answers, the published ports."""

    def __init__(self, box_dir: Path, config: RelayConfig) -> None:
        self.box_dir = box_dir
        self.config = config
        self.decider = Decider(config.policy)
        self.resolver = Resolver.from_env(self.decider, on_event=self.log)
        self.channel = grpc.insecure_channel(
            f"unix:{box_dir.absolute() / SHIM_SOCK_NAME}",
            options=[("grpc.max_receive_message_length", 4 * 1024 * 1024),
                     ("grpc.enable_retries", 0)],
        )
        self.stub = rpc.NetworkStub(self.channel)
        self.pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix="net")
        self._log_lock = threading.Lock()
        self._log = open(box_dir / NETWORK_LOG, "a", buffering=1)  # noqa: SIM115
        self.listeners: list[tuple[PortMapping, socket.socket]] = []
        self.udp = UdpFlows(self.stub, self.decider, self.log)
        self._missing_since: float | None = None

    def log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._log_lock:
            self._log.write(f"{stamp} {line}\n")

    # -- published ports ---------------------------------------------------------------------

    def bind_ports(self) -> list[dict[str, object]]:
        """Listen on every published port; return what was bound (``host_port`` 0 → the
        port the kernel picked). Raises OSError naming the address on failure."""
        bound = []
        for mapping in self.config.ports:
            family = socket.AF_INET6 if ":" in mapping.host_ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((mapping.host_ip, mapping.host_port))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot publish {mapping}: {mapping.host_ip}:"
                              f"{mapping.host_port}: {exc.strerror}") from None
            sock.listen(128)
            self.listeners.append((mapping, sock))
            actual = attrs.evolve(mapping, host_port=sock.getsockname()[1])
            bound.append(actual.to_json())
        return bound

    def serve_ports(self) -> None:
        for mapping, sock in self.listeners:
            threading.Thread(target=self._accept, args=(mapping, sock), daemon=True,
                             name=f"publish-{mapping.guest_port}").start()

    def _accept(self, mapping: PortMapping, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                time.sleep(0.1)
                continue
            self.pool.submit(self._published, mapping, client)

    def _published(self, mapping: PortMapping, client: socket.socket) -> None:
        stream = _Stream(self.stub.Dial, pb.NetFrame(port=mapping.guest_port))
        try:
            first = stream.incoming.get(timeout=DIAL_TIMEOUT)
        except queue.Empty:
            first = pb.NetFrame(reset=True, reason=f"no answer from the box in {DIAL_TIMEOUT:g} s")
        if first is None or first.reset:
            reason = first.reason if first is not None else "the box closed the channel"
            self.log(f"PUBLISH-FAIL {mapping}: {reason}")
            stream.end()
            _reset(client)
            return
        stream.pump(client)

    # -- caught connections and queries -----------------------------------------------------

    def box_gone(self) -> bool:
        """True once the agent socket has been missing for GONE_AFTER seconds (checked now
        and then by the caller)."""
        if (self.box_dir / SHIM_SOCK_NAME).exists():
            self._missing_since = None
            return False
        self._missing_since = self._missing_since or time.monotonic()
        return time.monotonic() - self._missing_since > GONE_AFTER

    def run_events(self) -> None:
        """Follow the agent's events until the box is gone."""
        while True:
            try:
                for event in self.stub.Events(pb.NetEventsRequest()):
                    if event.HasField("connect"):
                        self.pool.submit(self._connect, event.id, event.connect)
                    elif event.HasField("datagram"):
                        self.udp.handle(event.datagram)
                    else:
                        self.pool.submit(self._query, event.id, event.dns_query)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.log(f"ERROR events stream: {exc.code()}: {exc.details()}")
            if self.box_gone():
                return
            time.sleep(0.2)

    def _query(self, query_id: int, query: bytes) -> None:
        try:
            answer = self.resolver.answer(query)
        except Exception as exc:  # never leave the guest waiting on our mistake
            self.log(f"ERROR dns: {exc!r}")
            answer = b""
        try:
            self.stub.Answer(pb.NetAnswer(id=query_id, response=answer), timeout=10)
        except grpc.RpcError as exc:  # the guest's resolver retries; the log says why it must
            self.log(f"ERROR dns answer {query_id} not delivered: {exc.code()}: {exc.details()}")

    def _connect(self, conn_id: int, connect: pb.NetConnect) -> None:
        target = f"{connect.address}:{connect.port}"
        stream = _Stream(self.stub.Relay, pb.NetFrame(conn_id=conn_id))
        verdict = self.decider.check_connect(connect.address, connect.port)
        peeked = b""
        if not verdict.allowed and self.config.policy.mode is NetworkMode.ALLOWLIST:
            peeked, names = self._sniff(stream)
            if names:
                for name in names:
                    with contextlib.suppress(Exception):
                        self.resolver.resolve(name)
                verdict = self.decider.check_connect(connect.address, connect.port, names)
        if not verdict.allowed:
            self.log(f"DENY tcp {target} from {connect.source}: {verdict.reason}")
            stream.refuse(f"denied by the box's network policy: {verdict.reason}")
            return
        try:
            upstream = socket.create_connection((verdict.dial_ip, connect.port),
                                                timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self.log(f"FAIL tcp {target} (rule {verdict.rule}): {reason}")
            stream.refuse(f"{target}: {reason}")
            return
        upstream.settimeout(None)
        self.log(f"ALLOW tcp {target} from {connect.source} (rule {verdict.rule})")
        try:
            if peeked:
                upstream.sendall(peeked)
        except OSError as exc:
            stream.refuse(f"{target}: {exc.strerror}")
            _reset(upstream)
            return
        stream.pump(upstream)

    def _sniff(self, stream: _Stream) -> tuple[bytes, tuple[str, ...]]:
        """Read the container's first bytes (bounded) for a TLS SNI or an HTTP Host.
        Returns (the bytes read, to send on first if allowed; the names found)."""
        data = b""
        deadline = time.monotonic() + SNIFF_SECONDS
        while len(data) < SNIFF_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                frame = stream.incoming.get(timeout=left)
            except queue.Empty:
                break
            if frame is None or frame.reset or frame.eof:
                stream.incoming.put(frame)  # the pump sees the end too
                return data, peek_names(data).names
            data += frame.data
            found = peek_names(data)
            if found.complete:
                return data, found.names
        return data, peek_names(data).names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="boxlite_core.network.relay")
    parser.add_argument("--box-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    box_dir: Path = args.box_dir
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    config = RelayConfig.from_json(json.loads((box_dir / CONFIG_NAME).read_text()))
    relay = Relay(box_dir, config)
    try:
        bound = relay.bind_ports()
    except OSError as exc:
        print(f"netrelay: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 2
    relay.serve_ports()
    info = {"pid": os.getpid(), "start_time": start_time(os.getpid()), "ports": bound}
    tmp = box_dir / f".{RELAY_JSON}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, box_dir / RELAY_JSON)
    relay.log(f"START box {config.box}: {config.policy.describe()}"
              + "".join(f"; publish {PortMapping.from_json(p)}" for p in bound))
    if config.policy.mode is NetworkMode.NONE:  # published ports only
        while not relay.box_gone():
            time.sleep(1.0)
        return 0
    relay.run_events()
    return 0


if __name__ == "__main__":
    sys.exit(main())
