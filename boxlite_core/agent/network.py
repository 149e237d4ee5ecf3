"""The guest's end of box networking: catch connections and queries, hand them to the host.

The guest has no network device, only a dummy ``eth0`` that gives the container an address
and a default route. An nftables rule redirects every outbound TCP connection to a listener
of the agent (``CATCH_PORT`` on 127.0.0.1); the agent reads the original destination
(``SO_ORIGINAL_DST``, as transparent proxies do) and offers the connection to the host as an
event. DNS queries to the resolver address arrive on a UDP socket of the agent and go the
same way. Other UDP is redirected to a second agent socket (``UDP_CATCH_PORT``); its original
destination comes from the kernel's connection tracking table (``/proc/net/nf_conntrack``:
``SO_ORIGINAL_DST`` is TCP-only), and the host's replies, sent back from that socket, are
un-NATed by the same conntrack entry, so the container sees them come from where it sent.
The host decides by the box's policy and carries the bytes from its own sockets
(``Relay``, ``Datagram``); anything else (ICMP, raw packets, IPv6) leaves through the dummy
device and is gone, and nftables rejects it first so programs fail fast.

None of this is a security boundary: a root guest can remove the rules, and then its packets
go nowhere. The boundary is the host, which only ever connects what the policy allows.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..proto import agent_pb2 as pb
from . import command
from .container import safe_join
from .pid1 import Reaper, log

#: where the redirect sends the container's TCP connections (guest-local)
CATCH_PORT = 15001
#: where the redirect sends the container's UDP datagrams (guest-local, 127.0.0.1)
UDP_CATCH_PORT = 15002
#: the kernel's connection tracking table (CONFIG_NF_CONNTRACK_PROCFS, on in Debian kernels)
CONNTRACK_TABLE = "/proc/net/nf_conntrack"
#: getsockopt(SOL_IP, SO_ORIGINAL_DST): the destination before the NAT redirect
SO_ORIGINAL_DST = 80
#: the dummy device the container sees; docker's name
DEVICE = "eth0"
#: seconds a caught connection waits for the host's Relay before it is reset
CLAIM_TIMEOUT = 30.0
#: seconds a DNS query waits for the host's answer
DNS_TIMEOUT = 10.0
CHUNK = 256 * 1024
#: bytes one frame may carry: what is already waiting is sent together, as exec output is
#: (server/MERGE_LIMIT): each gRPC message costs a round of the sync server's send, so
#: 64 KiB frames held a box's uploads near 1 MiB/s under TCG
FRAME_LIMIT = 1024 * 1024
IP_TIMEOUT = 15.0


def nft_ruleset(resolver: str, address: str, *, egress: bool,
                udp_networks: Sequence[str] = ()) -> str:
    """The guest's nftables rules (``nft -f -`` input).

    Filter rules match on the destination after NAT: the output hook's interface is fixed
    before the redirect reroutes a packet to ``lo``. UDP is redirected only towards
    ``udp_networks`` (the policy's address rules): elsewhere the host would drop it, so it
    is rejected here at once (ICMP admin-prohibited: the sender fails fast)."""
    udp = (f"    meta l4proto udp ip daddr {{ {', '.join(udp_networks)} }} "
           f"redirect to :{UDP_CATCH_PORT}\n" if udp_networks else "")
    nat = (
        "  chain nat_out {\n"
        "    type nat hook output priority -100; policy accept;\n"
        "    ip daddr 127.0.0.0/8 return\n"
        f"    ip daddr {{ {resolver}, {address} }} return\n"
        f"    meta l4proto tcp redirect to :{CATCH_PORT}\n"
        + udp
        + "  }\n"
        if egress
        else ""
    )
    return (
        "table ip boxlite {\n"
        + nat
        + "  chain filter_out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        "    ip daddr 127.0.0.0/8 accept\n"
        f"    ip daddr {{ {resolver}, {address} }} accept\n"
        "    meta l4proto tcp reject with tcp reset\n"
        "    reject with icmp type admin-prohibited\n"
        "  }\n"
        "}\n"
        "table ip6 boxlite6 {\n"
        "  chain filter_out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        "    ip6 daddr ::1 accept\n"
        "    meta l4proto tcp reject with tcp reset\n"
        "    reject with icmpv6 type admin-prohibited\n"
        "  }\n"
        "}\n"
    )


def ip_batch(address_cidr: str, resolver: str, *, have_dummy0: bool) -> str:
    """``ip -batch -`` input: loopback up, the dummy device, its addresses, a default route.

    The dummy module makes ``dummy0`` when it loads (its ``numdummies=1`` default): that one is
    renamed, so the guest has one device, named as docker names it."""
    device = (f"link set dummy0 name {DEVICE}\n" if have_dummy0
              else f"link add {DEVICE} type dummy\n")
    return (
        "link set lo up\n"
        + device
        + f"addr add {address_cidr} dev {DEVICE}\n"
        f"addr add {resolver}/32 dev {DEVICE}\n"
        f"link set {DEVICE} up\n"
        f"route add default dev {DEVICE}\n"
    )


def refused_answer(query: bytes) -> bytes:
    """The query echoed back as a REFUSED answer (RFC 1035 4.1.1: QR=1, RCODE=5), so a
    resolver in the container fails at once while the host is not listening, instead of
    timing out. Only the fixed 12-byte header is touched; b"" for anything shorter."""
    if len(query) < 12:
        return b""
    flags = struct.unpack("!H", query[2:4])[0]
    flags = (flags | 0x8000) & ~0x000F | 5  # QR, keep opcode and RD, RCODE REFUSED
    return query[:2] + struct.pack("!H", flags) + query[4:]


#: ioctls and flags of <linux/sockios.h> and <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring ``lo`` up with SIOCSIFFLAGS (no ``ip`` process: this runs at every boot, before
    the agent serves). Without it a box with no network could not use 127.0.0.1 either.
    Best effort: a failure is logged."""
    import fcntl

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    except OSError as exc:
        log(f"warning: loopback: {exc}")


def recv_batch(sock: socket.socket) -> bytes:
    """One blocking recv, then whatever else is already waiting, up to FRAME_LIMIT bytes.
    b"" at EOF; raises OSError as recv does."""
    data = sock.recv(CHUNK)
    if not data:
        return data
    parts, size = [data], len(data)
    while size < FRAME_LIMIT:
        try:
            more = sock.recv(min(CHUNK, FRAME_LIMIT - size), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # reported by the next blocking recv
        if not more:
            break  # EOF: the next recv returns it again
        parts.append(more)
        size += len(more)
    return b"".join(parts)


def udp_original_destination(peer: tuple[str, int], table: str = CONNTRACK_TABLE
                             ) -> tuple[str, int] | None:
    """Where the container's datagram from ``peer`` (ip, port) was going before the redirect:
    the conntrack entry whose original tuple has that source and whose reply tuple comes
    from :data:`UDP_CATCH_PORT`. None when there is none (expired, or conntrack has no
    procfs). A socket sending to several destinations at once matches several entries: the
    first is taken (connected UDP sockets, as QUIC, NTP and DNS clients use, have one)."""
    want_src, want_sport = peer[0], str(peer[1])
    try:
        with open(table) as fh:
            lines = fh.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "udp" not in fields[:4]:
            continue
        tuples: list[dict[str, str]] = [{}, {}]
        current = 0
        for field in fields:
            key, sep, value = field.partition("=")
            if not sep or key not in ("src", "dst", "sport", "dport"):
                continue
            if key in tuples[current]:
                current += 1
                if current > 1:
                    break
            tuples[current][key] = value
        orig, reply = tuples
        if (orig.get("src") == want_src and orig.get("sport") == want_sport
                and reply.get("sport") == str(UDP_CATCH_PORT) and "dst" in orig
                and orig.get("dport", "").isdigit()):
            return orig["dst"], int(orig["dport"])
    return None


def _datagrams(sock: socket.socket, size: int,
               what: str) -> Iterator[tuple[bytes, tuple[str, int]]]:
    """(data, peer) of every datagram ``sock`` receives, forever; a failed receive is logged
    (naming ``what``) and retried after 0.1 s."""
    while True:
        try:
            yield sock.recvfrom(size)
        except OSError as exc:
            log(f"network: {what} receive failed: {exc}")
            time.sleep(0.1)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the connection was made to before the redirect (IPv4 sockaddr_in)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


class Conn:
    """One TCP connection the agent carries for the host (caught or dialled)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.closed = False

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), waking a reader blocked in recv first."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.sock.close()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self.sock.close()

    def pump(self, frames: Iterator[pb.NetFrame], first: pb.NetFrame | None = None
             ) -> Iterator[pb.NetFrame]:
        """Carry bytes both ways: ``frames`` (the host's) into the socket on a thread, the
        socket's bytes out as the yielded frames. Ends when both sides are done or either
        resets."""

        def to_socket() -> None:
            try:
                pending = [first] if first is not None else []
                for frame in itertools.chain(pending, frames):
                    if frame.reset:
                        self.reset()
                        return
                    if frame.data:
                        self.sock.sendall(frame.data)
                    if frame.eof:
                        self.sock.shutdown(socket.SHUT_WR)
                        return
            except Exception:  # the container closed, or the host's stream broke
                self.reset()

        writer = threading.Thread(target=to_socket, name="net-write", daemon=True)
        writer.start()
        try:
            while True:
                try:
                    data = recv_batch(self.sock)
                except OSError as exc:
                    if not self.closed:
                        yield pb.NetFrame(reset=True, reason=f"guest socket: {exc.strerror}")
                    return
                if not data:
                    if not self.closed:
                        yield pb.NetFrame(eof=True)
                    break
                yield pb.NetFrame(data=data)
            writer.join()
        finally:
            self.close()


class NetStack:
    """The agent's network state: configured once per boot, then serving the host."""

    def __init__(self, reaper: Reaper, state_dir: str) -> None:
        self.reaper = reaper
        self.state_dir = state_dir
        self.configured: pb.NetConfigureRequest | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._events: queue.Queue[pb.NetEvent] = queue.Queue()
        self._subscriber = 0  # token of the live Events call; 0 = none
        self._tokens = itertools.count(1)
        self._conns: dict[int, tuple[Conn, float]] = {}
        self._queries: dict[int, tuple[tuple[str, int], float]] = {}
        self._dns: socket.socket | None = None
        self._udp: socket.socket | None = None
        self._udp_misses = 0

    # -- Configure ---------------------------------------------------------------------------

    def configure(self, request: pb.NetConfigureRequest, root: str | None) -> int:
        """Set up the device, rules, listeners and the container's resolver files."""
        with self._lock:
            if self.configured is not None:
                if self.configured == request:  # a snapshot's copy: its source configured it
                    return CATCH_PORT
                raise ValueError("the network is already configured differently in this "
                                 "guest (a box continued from a snapshot keeps its source's)")
            self.configured = request
        address = request.address.split("/")[0]
        # nft rule text: only what parses as a network goes in, overlaps merged (an nft set
        # refuses overlapping intervals)
        udp_networks = [str(n) for n in ipaddress.collapse_addresses(
            ipaddress.IPv4Network(n) for n in request.udp_networks)]
        command.run(self.reaper, ["ip", "-batch", "-"],
                    stdin=ip_batch(request.address, request.resolver,
                                   have_dummy0=os.path.exists("/sys/class/net/dummy0")).encode(),
                    timeout=IP_TIMEOUT)
        command.run(self.reaper, ["nft", "-f", "-"],
                    stdin=nft_ruleset(request.resolver, address, egress=request.egress,
                                      udp_networks=udp_networks).encode(),
                    timeout=IP_TIMEOUT)
        if request.egress:
            listener = socket.create_server(("127.0.0.1", CATCH_PORT), backlog=128)
            threading.Thread(target=self._accept, args=(listener,), name="net-catch",
                             daemon=True).start()
            dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dns.bind((request.resolver, 53))
            self._dns = dns
            threading.Thread(target=self._serve_dns, args=(dns,), name="net-dns",
                             daemon=True).start()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", UDP_CATCH_PORT))
            self._udp = udp
            threading.Thread(target=self._serve_udp, args=(udp,), name="net-udp",
                             daemon=True).start()
        if root is not None:
            self._write_resolver_files(root, request)
        log(f"network configured: {request.address}, egress {'on' if request.egress else 'off'}")
        return CATCH_PORT

    def _write_resolver_files(self, root: str, request: pb.NetConfigureRequest) -> None:
        """/etc/resolv.conf and /etc/hosts of the container: files of the agent bind-mounted
        over the image's (created if missing), as docker does, so a read-only rootfs works
        and the image's own files are untouched."""
        from . import libc

        hostname = os.uname().nodename
        address = request.address.split("/")[0]
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{address}\t{hostname}"]
        hosts += [f"{h.address}\t{' '.join(h.names)}" for h in request.hosts]
        files = {
            "etc/resolv.conf": f"nameserver {request.resolver}\noptions ndots:0\n"
            if request.egress else "",
            "etc/hosts": "\n".join(hosts) + "\n",
        }
        net_dir = Path(self.state_dir) / "net"
        net_dir.mkdir(mode=0o755, exist_ok=True)
        for rel, text in files.items():
            source = net_dir / Path(rel).name
            source.write_text(text)
            source.chmod(0o644)
            try:
                target = safe_join(root, rel)
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
                libc.mount(str(source), target, None, libc.MS_BIND)
            except (OSError, ValueError) as exc:
                log(f"warning: /{rel} in the container: {exc}")

    # -- events ------------------------------------------------------------------------------

    def events(self, is_active) -> Iterator[pb.NetEvent]:
        """The host's subscription (see the Events RPC); replaces any earlier subscriber."""
        token = next(self._tokens)
        with self._lock:
            self._subscriber = token
        try:
            while is_active():
                with self._lock:
                    if self._subscriber != token:
                        return
                try:
                    event = self._events.get(timeout=0.5)
                except queue.Empty:
                    self._expire()
                    continue
                yield event
        finally:
            with self._lock:
                if self._subscriber == token:
                    self._subscriber = 0

    def _publish(self, event: pb.NetEvent) -> bool:
        with self._lock:
            if not self._subscriber:
                return False
        self._events.put(event)
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [i for i, (_, t) in self._conns.items() if now - t > CLAIM_TIMEOUT]
            conns = [self._conns.pop(i)[0] for i in stale]
            for i in [i for i, (_, t) in self._queries.items() if now - t > DNS_TIMEOUT]:
                del self._queries[i]
        for conn in conns:
            conn.reset()

    # -- caught connections ------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                log(f"network: accept failed: {exc}")
                time.sleep(0.1)
                continue
            conn = Conn(sock)
            try:
                address, port = original_destination(sock)
            except OSError:
                conn.reset()
                continue
            conn_id = next(self._ids)
            with self._lock:
                self._conns[conn_id] = (conn, time.monotonic())
            event = pb.NetEvent(id=conn_id, connect=pb.NetConnect(
                address=address, port=port, source=f"{peer[0]}:{peer[1]}"))
            if not self._publish(event):
                with self._lock:
                    self._conns.pop(conn_id, None)
                conn.reset()

    def relay(self, frames: Iterator[pb.NetFrame]) -> Iterator[pb.NetFrame]:
        """The Relay RPC: the first host frame names the connection."""
        first = next(frames, None)
        if first is None:
            return
        with self._lock:
            entry = self._conns.pop(first.conn_id, None)
        if entry is None:
            yield pb.NetFrame(reset=True, reason=f"no caught connection {first.conn_id}")
            return
        conn = entry[0]
        if first.reset:
            conn.reset()
            return
        yield from conn.pump(frames, first if (first.data or first.eof) else None)

    # -- DNS ---------------------------------------------------------------------------------

    def _serve_dns(self, sock: socket.socket) -> None:
        for data, peer in _datagrams(sock, 4096, "DNS"):
            query_id = next(self._ids)
            with self._lock:
                self._queries[query_id] = (peer, time.monotonic())
            if not self._publish(pb.NetEvent(id=query_id, dns_query=data)):
                with self._lock:
                    self._queries.pop(query_id, None)
                refused = refused_answer(data)
                if refused:
                    with contextlib.suppress(OSError):
                        sock.sendto(refused, peer)

    def answer(self, request: pb.NetAnswer) -> None:
        with self._lock:
            entry = self._queries.pop(request.id, None)
        if entry is None or not request.response or self._dns is None:
            return
        try:
            self._dns.sendto(request.response, entry[0])
        except OSError as exc:
            log(f"network: DNS answer to {entry[0]} failed: {exc}")

    # -- other UDP ---------------------------------------------------------------------------

    def _serve_udp(self, sock: socket.socket) -> None:
        for data, peer in _datagrams(sock, 65535, "UDP"):
            target = udp_original_destination(peer)
            if target is None:
                self._udp_misses += 1
                if self._udp_misses in (1, 10, 100) or self._udp_misses % 1000 == 0:
                    log(f"network: a datagram from {peer[0]}:{peer[1]} has no conntrack entry "
                        f"(dropped; {self._udp_misses} so far)")
                continue
            self._publish(pb.NetEvent(id=next(self._ids), datagram=pb.NetDatagram(
                address=target[0], port=target[1], source_address=peer[0],
                source_port=peer[1], data=data)))

    def datagram(self, request: pb.NetDatagram) -> None:
        """The Datagram RPC: the host's reply, sent from the catch socket; conntrack makes it
        come from ``request.address:port`` in the container's eyes."""
        if self._udp is None:
            raise ValueError("UDP is not caught in this box (its network has no egress)")
        try:
            self._udp.sendto(request.data, (request.source_address, request.source_port))
        except OSError as exc:
            log(f"network: UDP reply to {request.source_address}:{request.source_port} "
                f"failed: {exc}")

    # -- published ports ---------------------------------------------------------------------

    def dial(self, frames: Iterator[pb.NetFrame]) -> Iterator[pb.NetFrame]:
        """The Dial RPC: connect to the first frame's port on the box's loopback."""
        first = next(frames, None)
        if first is None:
            return
        if not 0 < first.port < 65536:
            yield pb.NetFrame(reset=True, reason=f"bad port {first.port}")
            return
        try:
            sock = socket.create_connection(("127.0.0.1", first.port), timeout=10.0)
        except OSError as exc:
            yield pb.NetFrame(reset=True,
                              reason=f"port {first.port} in the box: {exc.strerror or exc}")
            return
        sock.settimeout(None)
        yield pb.NetFrame()  # connected: the host may now accept bytes from its client
        extra = first if (first.data or first.eof) else None
        yield from Conn(sock).pump(frames, extra)
