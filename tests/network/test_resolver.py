"""The host-side resolver: only allowed names resolve, and what it hands out is remembered.

Most tests answer from a hosts file with every socket refused (nothing may go to the
network). The upstream tests use a small DNS server on 127.0.0.1 made here, never the
internet.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.network.policy import HOST_ALIAS_GUEST_IP, Decider, NetworkPolicy
from boxlite_core.network.resolver import HOSTS_ENV, Resolver

HOSTS = """# test names
203.0.113.10 svc.test alias.test
203.0.113.11 svc.test
127.0.0.1 rebind.test
169.254.169.254 metadata.test
2001:db8::1 six.test
bogus line
"""


@pytest.fixture
def no_network(monkeypatch):
    """Any socket or name lookup fails the test: with a hosts file nothing may go out."""

    def refuse(*args, **kwargs):
        raise AssertionError("the resolver used the network")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    return path


def make(hosts, allow, mode=None, events=None):
    decider = Decider(NetworkPolicy.parse(allow, mode))
    return decider, Resolver(decider, hosts, on_event=events.append if events is not None
                             else None)


def ask(resolver, name, rdtype="A", rdclass="IN"):
    query = dns.message.make_query(name, rdtype, rdclass)
    answer = dns.message.from_wire(resolver.answer(query.to_wire()))
    assert answer.id == query.id and answer.flags & dns.flags.QR
    assert answer.question == query.question
    return answer


def addresses(answer):
    """The A records of an answer, sorted (dnspython shuffles an RRset on the wire)."""
    return sorted(r.address for rrset in answer.answer for r in rrset)


def test_allowed_name_answers_and_is_remembered(hosts, no_network):
    events = []
    decider, resolver = make(hosts, ["svc.test:8080"], events=events)
    assert not decider.check_connect("203.0.113.10", 8080).allowed
    answer = ask(resolver, "svc.test")
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == ["203.0.113.10", "203.0.113.11"]
    assert answer.answer[0].ttl == 30
    assert decider.check_connect("203.0.113.10", 8080).allowed
    assert decider.check_connect("203.0.113.11", 8080).allowed
    assert any("svc.test A -> 203.0.113.10, 203.0.113.11" in e for e in events)


def test_other_names_do_not_resolve(hosts, no_network):
    events = []
    decider, resolver = make(hosts, ["svc.test"], events=events)
    for name in ("alias.test", "unknown.test", "svc.test.evil"):
        assert ask(resolver, name).rcode() == dns.rcode.NXDOMAIN, name
    assert resolver.resolve("alias.test") == ()
    assert not decider.check_connect("203.0.113.10", 80).allowed
    assert any(e.startswith("DNS-DENY alias.test A") for e in events)


def test_unlisted_allowed_name_is_nxdomain_without_the_network(hosts, no_network):
    _, resolver = make(hosts, (), "full")
    assert ask(resolver, "nowhere.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(resolver, "six.test").rcode() == dns.rcode.NXDOMAIN  # IPv6 only: no A
    assert resolver.resolve("nowhere.test") == ()


def test_aaaa_and_other_types_are_empty(hosts, no_network):
    events = []
    decider, resolver = make(hosts, ["svc.test:443"], events=events)
    for rdtype in ("AAAA", "TXT", "MX"):
        answer = ask(resolver, "svc.test", rdtype)
        assert answer.rcode() == dns.rcode.NOERROR and not answer.answer, rdtype
    assert any("svc.test AAAA -> no records (IPv6 is off" in e for e in events)
    assert ask(resolver, "alias.test", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert decider.check_connect("203.0.113.10", 443).allowed  # the AAAA lookup noted it


@pytest.mark.parametrize(("name", "ip"), [("rebind.test", "127.0.0.1"),
                                          ("metadata.test", "169.254.169.254")])
def test_rebinding_answer_still_cannot_be_reached(hosts, no_network, name, ip):
    decider, resolver = make(hosts, [name])
    assert addresses(ask(resolver, name)) == [ip]
    verdict = decider.check_connect(ip, 80, [name])
    assert not verdict.allowed and "RFC 6890" in verdict.reason


def test_host_alias(hosts, no_network):
    _, resolver = make(hosts, ["host.boxlite.internal:8000"])
    assert addresses(ask(resolver, "host.boxlite.internal")) == [HOST_ALIAS_GUEST_IP]
    assert not ask(resolver, "host.boxlite.internal", "AAAA").answer
    _, full = make(hosts, (), "full")
    assert ask(full, "host.boxlite.internal").rcode() == dns.rcode.NXDOMAIN


def test_none_mode_answers_nothing(hosts, no_network):
    _, resolver = make(hosts, (), None)
    assert ask(resolver, "svc.test").rcode() == dns.rcode.NXDOMAIN


def test_garbage_responses_and_odd_queries(hosts, no_network):
    events = []
    _, resolver = make(hosts, (), "full", events=events)
    assert resolver.answer(b"") == b""
    assert resolver.answer(b"\x00" * 5) == b""
    reply = dns.message.make_response(dns.message.make_query("svc.test", "A"))
    assert resolver.answer(reply.to_wire()) == b""  # a response, not a query
    # a readable header with a question that is not there: FORMERR, same id
    broken = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07svc"
    formerr = dns.message.from_wire(resolver.answer(broken))
    assert formerr.id == 0x1234 and formerr.rcode() == dns.rcode.FORMERR
    assert formerr.flags & dns.flags.RD
    assert resolver.answer(b"\x12\x34\x81\x00" + broken[4:]) == b""  # QR set: dropped
    notify = dns.message.make_query("svc.test", "A")
    notify.set_opcode(dns.opcode.NOTIFY)
    answer = dns.message.from_wire(resolver.answer(notify.to_wire()))
    assert answer.rcode() == dns.rcode.NOTIMP
    two = dns.message.make_query("svc.test", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("alias.test"), dns.rdataclass.IN,
                                        dns.rdatatype.A))
    assert dns.message.from_wire(resolver.answer(two.to_wire())).rcode() == dns.rcode.FORMERR
    assert ask(resolver, "version.bind", "TXT", "CH").rcode() == dns.rcode.REFUSED
    assert any(e.startswith("DNS-FORMERR id 4660") for e in events)


def test_resolve_for_sniffed_names(hosts, no_network):
    decider, resolver = make(hosts, ["svc.test:443"])
    assert resolver.resolve("SVC.test.") == ("203.0.113.10", "203.0.113.11")
    assert decider.check_connect("203.0.113.10", 443, ["svc.test"]).allowed
    assert resolver.resolve("bad name!") == ()
    assert resolver.resolve("alias.test") == ()  # listed, but not allowed


def test_from_env(hosts, monkeypatch, no_network):
    decider = Decider(NetworkPolicy.parse(["svc.test"], None))
    monkeypatch.setenv(HOSTS_ENV, str(hosts))
    assert "203.0.113.10" in addresses(ask(Resolver.from_env(decider), "svc.test"))
    monkeypatch.setenv(HOSTS_ENV, str(hosts) + ".missing")
    with pytest.raises(ConfigError, match=HOSTS_ENV):
        Resolver.from_env(decider)


# -- a real upstream, on loopback -------------------------------------------------------------


class FakeUpstream:
    """A DNS server on 127.0.0.1: up.test → 203.0.113.20, silent.test → no reply ever,
    anything else → NXDOMAIN. ``asked`` lists every name it was asked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.asked: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text(omit_final_dot=True)
            self.asked.append(name)
            if name == "silent.test":
                continue
            response = dns.message.make_response(query)
            if name == "up.test":
                response.answer.append(dns.rrset.from_text(
                    query.question[0].name, 300, "IN", "A", "203.0.113.20"))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def resolver(self) -> dns.resolver.Resolver:
        upstream = dns.resolver.Resolver(configure=False)
        upstream.nameservers = ["127.0.0.1"]
        upstream.port = self.port
        return upstream


@pytest.fixture
def upstream():
    server = FakeUpstream()
    yield server
    server.sock.close()


def test_upstream_resolution_caching_and_failures(upstream):
    events = []
    decider = Decider(NetworkPolicy.parse(["*.test:443"], None))
    resolver = Resolver(decider, timeout_s=0.5, on_event=events.append,
                        upstream=upstream.resolver())
    assert addresses(ask(resolver, "up.test")) == ["203.0.113.20"]
    assert ask(resolver, "up.test").answer[0].ttl == 30  # ours, not upstream's 300
    assert upstream.asked.count("up.test") == 1  # the second came from the cache
    assert decider.check_connect("203.0.113.20", 443).allowed
    assert ask(resolver, "gone.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(resolver, "silent.test").rcode() == dns.rcode.SERVFAIL
    assert any(e.startswith("DNS-FAIL silent.test A") and "SERVFAIL" in e for e in events)


def test_names_not_allowed_never_go_upstream(upstream):
    decider = Decider(NetworkPolicy.parse(["up.test"], None))
    resolver = Resolver(decider, timeout_s=0.5, upstream=upstream.resolver())
    assert ask(resolver, "exfil-a1b2c3.evil.test").rcode() == dns.rcode.NXDOMAIN
    assert resolver.resolve("exfil-d4e5f6.evil.test") == ()
    assert resolver.resolve("up.test") == ("203.0.113.20",)
    assert upstream.asked == ["up.test"]
