"""UDP for a box, on the host: one connected host socket per flow the policy allows.

A flow is (container address, container port, destination address, destination port). Its
first datagram is judged by ``Decider.check_udp`` (only an address or CIDR rule allows UDP:
a name rule cannot, since nothing in a datagram proves which name it is for); an allowed flow
gets a host UDP socket connected to the destination, and every datagram that comes back is
handed to the agent (``Datagram``), which delivers it as coming from that destination. A flow
idle for :data:`IDLE_SECONDS` is closed, as a NAT forgets a UDP mapping. Denied datagrams are
dropped (UDP has nothing to reset) and logged once per flow per :data:`DENY_LOG_SECONDS`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import grpc

from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as rpc
from .policy import Decider

#: seconds a flow lives without a datagram either way (conntrack's UDP stream timeout: 120)
IDLE_SECONDS = 120.0
#: most flows one box may hold open; beyond it new flows are dropped (and logged)
MAX_FLOWS = 256
#: a denied flow is logged again after this many seconds
DENY_LOG_SECONDS = 10.0
MAX_DATAGRAM = 65535

FlowKey = tuple[str, int, str, int]


class UdpFlows:
    """The UDP flows of one box's relay. ``handle`` is called for every datagram event."""

    def __init__(self, stub: rpc.NetworkStub, decider: Decider,
                 log: Callable[[str], None]) -> None:
        self.stub = stub
        self.decider = decider
        self.log = log
        self._lock = threading.Lock()
        self._flows: dict[FlowKey, socket.socket] = {}
        self._denied: dict[FlowKey, float] = {}

    def handle(self, datagram: pb.NetDatagram) -> None:
        key = (datagram.source_address, datagram.source_port, datagram.address, datagram.port)
        with self._lock:
            sock = self._flows.get(key)
        if sock is None:
            sock = self._open(key)
            if sock is None:
                return
        with contextlib.suppress(OSError):  # unreachable now: UDP's business, not ours
            sock.send(datagram.data)

    def _open(self, key: FlowKey) -> socket.socket | None:
        source = f"{key[0]}:{key[1]}"
        target = f"{key[2]}:{key[3]}"
        verdict = self.decider.check_udp(key[2], key[3])
        if not verdict.allowed:
            now = time.monotonic()
            if now - self._denied.get(key, -DENY_LOG_SECONDS) >= DENY_LOG_SECONDS:
                self._denied[key] = now
                self.log(f"DENY udp {target} from {source}: {verdict.reason}")
            return None
        with self._lock:
            if len(self._flows) >= MAX_FLOWS:
                self.log(f"DENY udp {target} from {source}: {MAX_FLOWS} UDP flows are open "
                         "already (each closes after "
                         f"{IDLE_SECONDS:g} s without traffic)")
                return None
        family = socket.AF_INET6 if ":" in verdict.dial_ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect((verdict.dial_ip, key[3]))
        except OSError as exc:
            sock.close()
            self.log(f"FAIL udp {target} (rule {verdict.rule}): {exc.strerror or exc}")
            return None
        sock.settimeout(IDLE_SECONDS)
        with self._lock:
            self._flows[key] = sock
        self.log(f"ALLOW udp {target} from {source} (rule {verdict.rule})")
        threading.Thread(target=self._replies, args=(key, sock), daemon=True,
                         name=f"udp-{key[1]}").start()
        return sock

    def _replies(self, key: FlowKey, sock: socket.socket) -> None:
        """Datagrams from the destination → the agent, until the flow idles out."""
        try:
            while True:
                try:
                    data = sock.recv(MAX_DATAGRAM)
                except TimeoutError:
                    return
                except OSError:  # ICMP unreachable surfaces as ECONNREFUSED: keep going
                    time.sleep(0.05)
                    continue
                try:
                    self.stub.Datagram(pb.NetDatagram(
                        address=key[2], port=key[3], source_address=key[0],
                        source_port=key[1], data=data), timeout=10)
                except grpc.RpcError:
                    return  # the box is gone or no longer catches UDP
        finally:
            with self._lock:
                self._flows.pop(key, None)
            sock.close()
