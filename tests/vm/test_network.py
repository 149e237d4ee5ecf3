"""Box networking on real VMs: the policy is enforced on the host, whatever a root guest does.

The "internet" is a network namespace this module makes (boxlite_testing.networld: a veth
pair, HTTP servers on 203.0.113.10:8080 and :8081, ``svc.test`` in a hosts file the box's
resolver reads through BOXLITE_NET_HOSTS); the host's own loopback gets a service too, which
no box may reach unless a rule names it. Nothing here leaves this machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request

import pytest

from boxlite_conformance.networld import BODY, SERVER_IP, SERVER_NAME, World, dns_answer
from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.network.policy import NetworkPolicy
from boxlite_core.network.relayctl import NETWORK_LOG
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm

#: busybox wget (-O- to stdout; exit status 0 only on a 2xx answer). Not -T: busybox 1.35-static
#: wget segfaults with it
WGET = "wget -q -O- {url}"
#: an HTTP GET by hand, bounded by nc's own timeout
GET_8081 = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {SERVER_IP} 8081"
#: a DNS query over UDP to the test world's server on PORT (busybox has no ``nc -u``; its
#: nslookup takes ADDRESS:PORT, and drops an answer from any other address or port)
UDP_QUERY = "nslookup {name} " + SERVER_IP + ":{port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    why = World.available()
    if why:
        pytest.skip(f"network test world: {why}")
    hosts = tmp_path_factory.mktemp("networld") / "hosts"
    with World(tag=str(os.getpid() % 100000), hosts_file=hosts) as w:
        w.serve(8080)
        w.serve(8081)
        w.serve_dns(5353)
        w.serve_dns(5354)
        yield w


@pytest.fixture(scope="module")
def host_service():
    """A TCP service on the host's 127.0.0.1 that answers one line to anyone who connects."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"host secret\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def make_box(runtime, world, monkeypatch):
    monkeypatch.setenv("BOXLITE_NET_HOSTS", str(world.hosts_file))
    made = []

    def make(**options):
        box = runtime.create(BoxOptions(image="busybox", name=unique("net"), memory_mib=256,
                                        **options))
        made.append(box)
        box.start()
        return box

    yield make
    for box in made:
        with contextlib.suppress(Exception):
            runtime.remove(box.id, force=True)


def sh(box, script: str, timeout: float = 60):
    began = time.monotonic()
    result = box.exec(["sh", "-c", script], timeout=timeout)
    return result, time.monotonic() - began


def fetch(box, url: str):
    return sh(box, WGET.format(url=url))


def network_log(box) -> str:
    path = box.dir / NETWORK_LOG
    return path.read_text() if path.exists() else ""


def test_default_box_reaches_nothing(make_box, world, host_service):
    box = make_box()
    for url in (f"http://{SERVER_IP}:8080/", f"http://127.0.0.1:{host_service}/",
                "http://169.254.169.254/"):
        result, took = fetch(box, url)
        assert result.exit_code != 0, url
        assert took < 10, f"{url}: a box with no network must fail fast, took {took:.1f} s"
    result, _ = sh(box, "ip route; ip addr")
    assert "default" not in result.text and "eth0" not in result.text


def test_address_rule_allows_its_port_only(make_box, world):
    box = make_box(network=NetworkPolicy.parse([f"{SERVER_IP}:8080"], None))
    result, _ = fetch(box, f"http://{SERVER_IP}:8080/")
    assert result.exit_code == 0 and f"{BODY} 8080" in result.text
    result, took = fetch(box, f"http://{SERVER_IP}:8081/")
    assert result.exit_code != 0 and took < 10
    log = network_log(box)
    assert f"DENY tcp {SERVER_IP}:8081" in log and "8081" in log.split("DENY", 1)[1]
    assert f"ALLOW tcp {SERVER_IP}:8080" in log


def test_name_rule_needs_the_name(make_box, world):
    box = make_box(network=NetworkPolicy.parse([SERVER_NAME], None))
    # by number first: no name was resolved for that address, and the Host header names none
    result, took = fetch(box, f"http://{SERVER_IP}:8080/")
    assert result.exit_code != 0 and took < 10
    result, _ = fetch(box, f"http://{SERVER_NAME}:8080/")
    assert result.exit_code == 0 and f"{BODY} 8080" in result.text, result.stderr
    # names outside the allowlist do not resolve at all
    result, _ = sh(box, "nslookup other.test")
    assert result.exit_code != 0
    # busybox asks A and AAAA at once and the host answers them in either order; ten times
    # over, both answers must be taken. Their query ids come from the guest's clock: on a
    # jiffies clocksource both got one id, so busybox dropped one answer as a duplicate and
    # waited out its 5 s timeout ("Can't find ...: No answer"), or took the AAAA answer for
    # the A query and printed no address at all.
    result, _ = sh(box, f"for i in $(seq 10); do nslookup {SERVER_NAME}; done")
    assert result.text.count(f"Address: {SERVER_IP}") == 10 and "Can't" not in result.text, (
        f"{result.text}\n--- network log ---\n{network_log(box)[-3000:]}")


def udp(box, port: int, name: str = "any.test"):
    """(answered?, seconds): whether the query to the test world's PORT was answered."""
    result, took = sh(box, UDP_QUERY.format(name=name, port=port))
    return dns_answer(port) in result.text, took


def test_udp_goes_where_an_address_rule_allows(make_box, world):
    box = make_box(network=NetworkPolicy.parse([f"{SERVER_IP}:5353", SERVER_NAME], None))
    # twice: a flow's second datagram goes on the flow the first opened
    for name in ("one.test", "two.test"):
        answered, _ = udp(box, 5353, name)
        assert answered, name
    # the same address on another port: the name rule covering it does not allow UDP
    answered, took = udp(box, 5354)
    assert not answered and took < 20
    assert f"DENY udp {SERVER_IP}:5354" in network_log(box)
    assert f"ALLOW udp {SERVER_IP}:5353" in network_log(box)
    # the box's own resolver still answers (its UDP is not sent out as a flow)
    result, _ = sh(box, f"nslookup {SERVER_NAME}")
    assert result.exit_code == 0 and SERVER_IP in result.text, (
        f"{result.text}\n--- network log ---\n{network_log(box)[-3000:]}")


def test_udp_by_cidr_any_port_and_never_by_mode_alone(make_box, world):
    box = make_box(network=NetworkPolicy.parse([f"{SERVER_IP}/32"], None))
    for port in (5353, 5354):
        answered, _ = udp(box, port)
        assert answered, port
    # --network full opens TCP to public addresses, not UDP: no rule names the address, so
    # the guest refuses the datagram itself, at once
    full = make_box(network=NetworkPolicy.parse((), "full"))
    answered, took = udp(full, 5353)
    assert not answered and took < 10


def test_name_rule_with_address_rule(make_box, world):
    box = make_box(network=NetworkPolicy.parse([SERVER_NAME, f"{SERVER_IP}:8081"], None))
    result, _ = fetch(box, f"http://{SERVER_IP}:8081/")
    assert result.exit_code == 0


def test_full_mode_reaches_public_not_host_or_metadata(make_box, world, host_service):
    box = make_box(network=NetworkPolicy.parse((), "full"))
    result, _ = fetch(box, f"http://{SERVER_IP}:8081/")
    assert result.exit_code == 0 and f"{BODY} 8081" in result.text
    for target in (f"127.0.0.1:{host_service}", f"{'10.0.2.2'}:{host_service}",
                   "169.254.169.254:80", "192.168.1.1:80", "10.1.2.3:80"):
        result, took = sh(box, f"echo | nc -w 3 {target.replace(':', ' ')}")
        assert "host secret" not in result.text, target
        assert took < 10, f"{target}: denied connections must fail fast ({took:.1f} s)"


def test_host_alias_rule(make_box, world, host_service):
    box = make_box(network=NetworkPolicy.parse([f"host.boxlite.internal:{host_service}"], None))
    result, _ = sh(box, f"nc -w 5 host.boxlite.internal {host_service} </dev/null")
    assert "host secret" in result.text, result.stderr


def test_root_guest_bypass_attempts_fail_closed(make_box, world):
    box = make_box(network=NetworkPolicy.parse([f"{SERVER_NAME}:8080"], None))
    attempts = {
        # another resolver, over UDP and TCP
        "dns elsewhere": f"nslookup {SERVER_NAME} {SERVER_IP}",
        "dns over tcp": f"echo | nc -w 3 {SERVER_IP} 53",
        # a new route / address: there is still no device that leads anywhere
        "static route": f"ip route add {SERVER_IP}/32 dev eth0; {GET_8081}; "
                        f"ip route del {SERVER_IP}/32 dev eth0",
        # the address becomes the box's own: the connection goes nowhere (it hangs until
        # nc's -w, which is why nc here: fail closed, not fast)
        "address change": f"ip addr add {SERVER_IP}/24 dev eth0; {GET_8081}; "
                          f"ip addr del {SERVER_IP}/24 dev eth0",
        # raw sockets (ping) and a second interface
        "raw icmp": f"ping -c 1 -W 2 {SERVER_IP}",
        "second interface": f"ip link add x0 type dummy && ip addr add 203.0.113.99/24 dev x0 "
                            f"&& ip link set x0 up && {GET_8081}; ip link del x0",
    }
    for what, script in attempts.items():
        result, took = sh(box, script)
        assert BODY not in result.text, what
        # nc "connects" (the box's own stack accepts, the host then resets): judged by the
        # answer and the log, not the exit status
        if "nc " not in script:
            assert result.exit_code != 0, what
        assert took < 20, f"{what}: took {took:.1f} s"
    assert f"DENY tcp {SERVER_IP}:53" in network_log(box)
    # the allowed path still works afterwards
    result, _ = fetch(box, f"http://{SERVER_NAME}:8080/")
    assert result.exit_code == 0, result.stderr


def serve_http(box, text: str) -> None:
    """busybox httpd on the box's port 8000, in an exec of its own (an exec's processes end
    with it: each has its own pid namespace), serving /www/index.html = ``text``."""
    sh(box, f"mkdir -p /www && echo {text} > /www/index.html")
    box.exec_stream(["httpd", "-f", "-p", "8000", "-h", "/www"])
    result, _ = sh(box, "for i in $(seq 50); do echo | nc -w 1 127.0.0.1 8000 >/dev/null && "
                        "exit 0; sleep 0.2; done; exit 1")
    assert result.exit_code == 0, "httpd did not listen in the box"


def test_published_port(make_box, world):
    box = make_box(ports=["127.0.0.1:0:8000"])
    serve_http(box, "published-file")
    info = box.info()
    ports = info["state"]["network"]["ports"]
    assert len(ports) == 1 and ports[0]["guest_port"] == 8000 and ports[0]["host_port"] > 0
    host_port = ports[0]["host_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/index.html", timeout=30) as r:
        assert r.read() == b"published-file\n"
    # a port nothing listens on in the box: the host's client is reset quickly
    other = make_box(ports=["127.0.0.1:0:9"])
    other_port = other.info()["state"]["network"]["ports"][0]["host_port"]
    began = time.monotonic()
    with pytest.raises(OSError), urllib.request.urlopen(
            f"http://127.0.0.1:{other_port}/", timeout=30):
        pass
    assert time.monotonic() - began < 20


def test_boxes_cannot_reach_each_other(make_box, world):
    server = make_box(ports=["127.0.0.1:0:8000"])
    serve_http(server, "b")
    port = server.info()["state"]["network"]["ports"][0]["host_port"]
    client = make_box(network=NetworkPolicy.parse((), "full"))
    for target in (f"127.0.0.1:{port}", f"10.0.2.2:{port}", "10.0.2.15:8000"):
        result, _ = sh(client, f"wget -q -O- http://{target}/index.html")
        assert result.exit_code != 0, target


def test_bad_rules_are_refused_before_anything_starts():
    for rule in ("", "http://x.test", "*.", "a.*.test", "1.2.3.4:0", "host:99999"):
        with pytest.raises(ConfigError):
            NetworkPolicy.parse([rule], None)


def test_fork_keeps_the_policy_not_the_ports(make_box, runtime, world):
    box = make_box(network=NetworkPolicy.parse([f"{SERVER_IP}:8080"], None),
                   ports=["127.0.0.1:0:8000"])
    (clone,) = box.fork()
    try:
        assert clone.info()["state"]["network"]["ports"] == []
        assert clone.record.options.network == box.record.options.network
        for which in (clone, box):
            result, _ = fetch(which, f"http://{SERVER_IP}:8080/")
            assert result.exit_code == 0, which.name
            result, _ = fetch(which, f"http://{SERVER_IP}:8081/")
            assert result.exit_code != 0, which.name
        assert box.info()["state"]["network"]["ports"][0]["host_port"] > 0
    finally:
        runtime.remove(clone.id, force=True)


def test_every_box_has_a_loopback(make_box, world):
    box = make_box()
    box.exec_stream(["sh", "-c", "echo local | nc -l -p 7000"])
    result, _ = sh(box, "for i in $(seq 50); do nc 127.0.0.1 7000 </dev/null && exit 0; "
                        "sleep 0.2; done; exit 1")
    assert result.exit_code == 0 and "local" in result.text
