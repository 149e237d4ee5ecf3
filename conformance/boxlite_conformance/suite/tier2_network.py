"""T2 network: a box reaches what its policy allows and nothing else; published ports work.

Gated on ``Capability.NETWORK``. The "outside world" is the suite's own (networld.World: a
network namespace with HTTP servers on 203.0.113.10:8080 and :8081, a DNS server on UDP
:5353, ``svc.test`` in a hosts
file the box's host-side resolver reads through BOXLITE_NET_HOSTS). Denials must be quick:
a box waits for a refused connection no longer than for an allowed one.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from boxlite_core.vmm.spec import Capability

from ..boxes import BoxPool
from ..markers import needs_host, requires, tier
from ..networld import BODY, SERVER_IP, SERVER_NAME, World, dns_answer

__all__ = ["TestNetwork"]

#: bounded by nc's own timeout (busybox wget's -T crashes the static busybox of the image)
GET = "printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 5 {target} {port}"
#: a DNS query over UDP to the world's server on a port (busybox has no ``nc -u``)
UDP_QUERY = "nslookup any.test " + SERVER_IP + ":{port}"
#: seconds a denied connection may take to fail
QUICK = 10.0


def _policy(allow: list[str], mode: str | None = None) -> Any:
    from boxlite_core.network.policy import NetworkPolicy

    return NetworkPolicy.parse(allow, mode)


def _get(box: Any, target: str, port: int, host: str | None = None) -> tuple[str, float]:
    """What an HTTP GET to target:port printed, and the seconds it took (it may fail)."""
    began = time.monotonic()
    result = box.exec(["sh", "-c", GET.format(host=host or target, target=target, port=port)],
                      timeout=60)
    return result.stdout.decode(errors="replace"), time.monotonic() - began


@tier(2)
@pytest.mark.vm
@requires(Capability.NETWORK)
@needs_host("test-network")
class TestNetwork:
    def test_no_policy_no_network(self, box_pool: BoxPool, world: World) -> None:
        box = box_pool.shared("net-none", memory_mib=256)
        text, took = _get(box, SERVER_IP, 8080)
        assert BODY not in text and took < QUICK

    def test_allowlist_by_address_and_name(self, box_pool: BoxPool, world: World) -> None:
        box = box_pool.fresh(memory_mib=256,
                             network=_policy([f"{SERVER_IP}:8081", f"{SERVER_NAME}:8080",
                                              f"{SERVER_IP}:5353"]))
        try:
            text, _ = _get(box, SERVER_IP, 8081)
            assert f"{BODY} 8081" in text, "an address rule did not let its port through"
            text, took = _get(box, SERVER_IP, 8080)  # no name was resolved for it yet
            assert BODY not in text and took < QUICK, "a name rule opened an address by number"
            text, _ = _get(box, SERVER_NAME, 8080)
            assert f"{BODY} 8080" in text, "a name rule did not let its name through"
            answer = box.exec(["sh", "-c", UDP_QUERY.format(port=5353)], timeout=60)
            assert dns_answer(5353) in answer.stdout.decode(errors="replace"), (
                "UDP to an address rule's port was not carried")
        finally:
            box_pool.discard(box)

    def test_full_mode_keeps_the_host_and_private_ranges_out(
        self, box_pool: BoxPool, world: World
    ) -> None:
        box = box_pool.fresh(memory_mib=256, network=_policy([], "full"))
        try:
            text, _ = _get(box, SERVER_IP, 8081)
            assert f"{BODY} 8081" in text
            for target in ("127.0.0.1", "10.0.2.2", "169.254.169.254", "192.168.0.1"):
                text, took = _get(box, target, 22)
                assert "SSH" not in text and took < QUICK, target
        finally:
            box_pool.discard(box)

    def test_published_port(self, box_pool: BoxPool, world: World, tmp_path: Path) -> None:
        from ..guest_probe import run

        box = box_pool.fresh(memory_mib=256, ports=["127.0.0.1:0:8000"])
        try:
            run(box, ["sh", "-c", "mkdir -p /www && echo conformance > /www/index.html"])
            box.exec_stream(["httpd", "-f", "-p", "8000", "-h", "/www"])
            run(box, ["sh", "-c", "for i in $(seq 50); do echo | nc -w 1 127.0.0.1 8000 "
                                  ">/dev/null && exit 0; sleep 0.2; done; exit 1"])
            port = box.info()["state"]["network"]["ports"][0]["host_port"]
            url = f"http://127.0.0.1:{port}/index.html"
            with urllib.request.urlopen(url, timeout=30) as answer:
                assert answer.read() == b"conformance\n"
        finally:
            box_pool.discard(box)
