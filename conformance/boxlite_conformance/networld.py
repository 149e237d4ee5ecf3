"""A small "outside world" for network tests: a network namespace joined to the host by a
veth pair, with TCP servers on an address from TEST-NET-3 (203.0.113.0/24, RFC 5737).

Why a namespace: tests must never reach a real address. The pair is addressed point to
point (``HOST_SIDE`` peer ``SERVER_IP``, both /32), so the host's routing table gains one
route, to ``SERVER_IP`` alone, while the world exists: never the whole /24, which on these
machines also holds the package registries' proxy (203.0.113.80 answered for deb.debian.org
and pypi.org; a /24 on the veth cut a kit build off from them). Each ``serve(port)`` runs
a tiny HTTP server on ``SERVER_IP`` (Python's ``http.server`` inside the namespace, started with
``ip netns exec``) answering ``GET /`` with ``BODY`` and the port; each ``serve_dns(port)`` a
DNS server over UDP there, whose answer names its port. A hosts file names the server for
the box's host-side resolver (``BOXLITE_NET_HOSTS``).

Needs root and iproute2 (`ip`); ``World.available()`` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs

SERVER_IP = "203.0.113.10"
HOST_SIDE = "203.0.113.1"
BODY = "hello from the test world"
#: the /24 (TEST-NET-2, RFC 5737) the test DNS servers answer from: see ``dns_answer``
DNS_ANSWER_PREFIX = "198.51.100."
#: the name the hosts file gives SERVER_IP
SERVER_NAME = "svc.test"
IP_TIMEOUT = 20.0


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _answers_tcp(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((SERVER_IP, port), 1):
        return True
    return False


def dns_answer(port: int) -> str:
    """The address ``serve_dns(port)`` gives every name: in TEST-NET-2, never dialled."""
    return f"{DNS_ANSWER_PREFIX}{port % 256}"


def _answers_dns(port: int) -> bool:
    import dns.exception
    import dns.message
    import dns.query

    with contextlib.suppress(OSError, dns.exception.DNSException):
        reply = dns.query.udp(dns.message.make_query("ready.test", "A"), SERVER_IP, timeout=0.5,
                              port=port)
        return dns_answer(port) in reply.to_text()
    return False


@attrs.define
class World:
    """One namespace + veth pair; use as a context manager (removes everything on exit)."""

    tag: str
    hosts_file: Path
    servers: list[subprocess.Popen] = attrs.field(factory=list)

    @staticmethod
    def available() -> str | None:
        """None if a world can be made here, else why not."""
        if os.geteuid() != 0:
            return "needs root (network namespaces and veth)"
        if shutil.which("ip") is None:
            return "needs `ip` (Debian package iproute2)"
        return None

    @property
    def netns(self) -> str:
        return f"bxw-{self.tag}"

    @property
    def host_link(self) -> str:
        return f"bxw{self.tag}h"[:15]

    def __enter__(self) -> World:
        self.remove()  # what a killed earlier run left
        ns_link = f"bxw{self.tag}n"[:15]
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", ns_link)
            _ip("link", "set", ns_link, "netns", self.netns)
            _ip("addr", "add", f"{HOST_SIDE}/32", "peer", f"{SERVER_IP}/32", "dev",
                self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("addr", "add", f"{SERVER_IP}/32", "peer", f"{HOST_SIDE}/32", "dev", ns_link,
                netns=self.netns)
            _ip("link", "set", ns_link, "up", netns=self.netns)
            _ip("link", "set", "lo", "up", netns=self.netns)
            self.hosts_file.write_text(f"{SERVER_IP} {SERVER_NAME}\n")
        except BaseException:
            self.remove()
            raise
        return self

    def serve(self, port: int) -> None:
        """An HTTP server on SERVER_IP:port in the namespace; returns once it accepts."""
        code = (
            "import http.server, sys\n"
            "port = int(sys.argv[1])\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            f"        body = ('{BODY} ' + str(port) + '\\n').encode()\n"
            "        self.send_response(200)\n"
            "        self.send_header('Content-Length', str(len(body)))\n"
            "        self.end_headers()\n"
            "        self.wfile.write(body)\n"
            "    def log_message(self, *a):\n"
            "        pass\n"
            f"http.server.ThreadingHTTPServer(('{SERVER_IP}', port), H).serve_forever()\n"
        )
        self._start(code, port, _answers_tcp)

    def serve_dns(self, port: int) -> None:
        """A DNS server over UDP on SERVER_IP:port in the namespace (dnspython) answering
        every A query, for any name, with :func:`dns_answer` ``(port)`` and every other
        query with no records; returns once it answers. What UDP tests send: busybox has no
        ``nc -u``, but its ``nslookup NAME ADDRESS:PORT`` sends a datagram to any port."""
        code = (
            "import socket, sys\n"
            "import dns.message, dns.rdatatype, dns.rrset\n"
            "port = int(sys.argv[1])\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('{SERVER_IP}', port))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(65535)\n"
            "    try:\n"
            "        query = dns.message.from_wire(data)\n"
            "    except Exception:\n"
            "        continue\n"
            "    reply = dns.message.make_response(query)\n"
            "    q = query.question[0]\n"
            "    if q.rdtype == dns.rdatatype.A:\n"
            f"        reply.answer.append(dns.rrset.from_text(q.name, 60, 'IN', 'A', "
            f"'{DNS_ANSWER_PREFIX}' + str(port % 256)))\n"
            "    s.sendto(reply.to_wire(), peer)\n"
        )
        self._start(code, port, _answers_dns)

    def _start(self, code: str, port: int, ready: Callable[[int], bool]) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", code, str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.servers.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if ready(port):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"test server on port {port} exited: "
                                   f"{proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        raise RuntimeError(f"test server on {SERVER_IP}:{port} did not answer within 15 s")

    def remove(self) -> None:
        for proc in self.servers:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.servers.clear()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _ip("link", "del", self.host_link)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _ip("netns", "del", self.netns)

    def __exit__(self, *exc: object) -> None:
        self.remove()
