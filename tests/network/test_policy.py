"""The network policy: rule forms, modes, the special ranges, and each decision's reason."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.network.policy import (
    HOST_ALIAS_GUEST_IP,
    SPECIAL_NETWORKS,
    Decider,
    NetworkMode,
    NetworkPolicy,
    RuleKind,
    parse_rule,
)

# -- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "port"), [
    ("pypi.org", RuleKind.HOST, None),
    ("PyPI.org.:443", RuleKind.HOST, 443),
    ("a_b.example:1", RuleKind.HOST, 1),
    ("*.example.com", RuleKind.WILDCARD, None),
    ("*.example.com:8443", RuleKind.WILDCARD, 8443),
    ("*.com", RuleKind.WILDCARD, None),
    ("203.0.113.10", RuleKind.ADDRESS, None),
    ("203.0.113.10:65535", RuleKind.ADDRESS, 65535),
    ("2001:db8::1", RuleKind.ADDRESS, None),
    ("[2001:db8::1]", RuleKind.ADDRESS, None),
    ("[2001:db8::1]:443", RuleKind.ADDRESS, 443),
    ("10.0.0.0/8", RuleKind.NETWORK, None),
    ("10.0.0.0/8:22", RuleKind.NETWORK, 22),
    ("2001:db8::/32", RuleKind.NETWORK, None),
    ("[2001:db8::/32]:443", RuleKind.NETWORK, 443),
    ("host.boxlite.internal", RuleKind.HOST_ALIAS, None),
    ("Host.BoxLite.Internal:8000", RuleKind.HOST_ALIAS, 8000),
    ("bücher.example", RuleKind.HOST, None),
])
def test_rule_forms(text, kind, port):
    rule = parse_rule(text)
    assert (rule.kind, rule.port, rule.text) == (kind, port, text)
    assert (rule.name is None) == (kind in (RuleKind.ADDRESS, RuleKind.NETWORK))
    assert (rule.network is None) != (kind in (RuleKind.ADDRESS, RuleKind.NETWORK))


def test_rule_fields_are_normalised():
    assert parse_rule("PyPI.org.:443").name == "pypi.org"
    assert parse_rule("bücher.example").name == "xn--bcher-kva.example"
    assert parse_rule("*.Example.COM").name == "example.com"
    assert parse_rule("203.0.113.10").network == ipaddress.ip_network("203.0.113.10/32")
    assert parse_rule("[2001:db8::/32]:443").network == ipaddress.ip_network("2001:db8::/32")
    assert parse_rule(" pypi.org ").text == "pypi.org"


@pytest.mark.parametrize("text", [
    "", "  ", "*", "*.", "*.*.com", "a.*.com", "*foo.com", "**.com", "foo.*",
    "http://pypi.org", "https://pypi.org:443", "pypi.org/simple", "a b", "a\tb",
    "1.2.3.4:0", "host:65536", "host:http", "host:", "host:٣", "1.2.3.4:80:90",
    "1.2.3.4/33", "10.0.0.0/x", "[2001:db8::1", "[::1]x", "[::1]:", "[1.2.3.4]:80",
    "2001:db8::zz", "-bad-.com", "a..com", "1.2.3.256", "x" * 64 + ".com",
])
def test_bad_rules_name_the_rule_and_the_forms(text):
    with pytest.raises(ConfigError) as err:
        parse_rule(text)
    assert repr(text) in str(err.value) and "accepted forms" in str(err.value)


# -- the policy -------------------------------------------------------------------------------


def test_modes():
    assert NetworkPolicy.parse((), None).mode is NetworkMode.NONE
    assert NetworkPolicy.parse((), "none").mode is NetworkMode.NONE
    assert NetworkPolicy.parse(["pypi.org"], None).mode is NetworkMode.ALLOWLIST
    assert NetworkPolicy.parse(["pypi.org"], "allowlist").mode is NetworkMode.ALLOWLIST
    assert NetworkPolicy.parse((), "full").mode is NetworkMode.FULL
    assert NetworkPolicy.parse(["10.0.0.0/8"], "FULL").rules[0].kind is RuleKind.NETWORK
    assert NetworkPolicy.parse("pypi.org", None).rules[0].name == "pypi.org"  # one string


@pytest.mark.parametrize(("allow", "mode", "says"), [
    (["pypi.org"], "none", "drop one"),
    ((), "allowlist", "at least one"),
    ((), "wide", "expected none, allowlist or full"),
    (["http://x"], None, "accepted forms"),
])
def test_bad_policies(allow, mode, says):
    with pytest.raises(ConfigError, match=says):
        NetworkPolicy.parse(allow, mode)


def test_policy_checks_itself_when_built_directly():
    with pytest.raises(ConfigError):
        NetworkPolicy(NetworkMode.NONE, (parse_rule("pypi.org"),))
    assert NetworkPolicy("full").mode is NetworkMode.FULL


def test_policy_json_round_trip():
    for policy in (NetworkPolicy.parse(["svc.test:8080", "*.example.com", "10.1.0.0/16",
                                        "[2001:db8::/32]:443", "host.boxlite.internal:8000"],
                                       None),
                   NetworkPolicy.parse((), "full"), NetworkPolicy.parse((), None)):
        data = policy.to_json()
        assert isinstance(data["mode"], str) and isinstance(data["rules"], list)
        assert NetworkPolicy.from_json(data) == policy


@pytest.mark.parametrize("data", [
    {"mode": "wide", "rules": []}, {"mode": "allowlist", "rules": "pypi.org"},
    {"mode": 1}, {"mode": "allowlist", "rules": [1]}, {"mode": "allowlist", "rules": ["*"]},
])
def test_policy_from_bad_json(data):
    with pytest.raises(ConfigError):
        NetworkPolicy.from_json(data)


def test_describe():
    assert NetworkPolicy.parse((), None).describe() == "none (no network)"
    assert NetworkPolicy.parse((), "full").describe() == "full (public addresses)"
    assert NetworkPolicy.parse(["10.0.0.0/8"], "full").describe() == \
        "full (public addresses, plus 10.0.0.0/8)"
    assert NetworkPolicy.parse(["pypi.org:443", "*.test"], None).describe() == \
        "allowlist: pypi.org:443, *.test"


# -- special ranges ---------------------------------------------------------------------------


def _sample(net):
    return str(net.network_address + 1 if net.num_addresses > 1 else net.network_address)


def _address_rule(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _cidr_rule(net, port):
    return f"[{net}]:{port}" if net.version == 6 else f"{net}:{port}"


@pytest.mark.parametrize("net", SPECIAL_NETWORKS, ids=str)
def test_each_special_range_is_closed_unless_an_address_rule_names_it(net):
    ip = _sample(net)
    for allow, mode in (((), "full"), (["svc.test"], None), (["*.test"], "full")):
        decider = Decider(NetworkPolicy.parse(allow, mode))
        decider.note_resolution("svc.test", [ip])  # DNS rebinding: a name rule still says no
        verdict = decider.check_connect(ip, 80, ["svc.test"])
        assert not verdict.allowed and "RFC 6890" in verdict.reason, (allow, mode)
        assert verdict.dial_ip == "" and verdict.rule is None
    for rule in (_address_rule(ip, 80), _cidr_rule(net, 80)):
        for mode in (None, "full"):
            verdict = Decider(NetworkPolicy.parse([rule], mode)).check_connect(ip, 80)
            assert verdict.allowed and verdict.rule == rule and verdict.dial_ip == ip, rule


def test_public_test_net_is_not_special():
    decider = Decider(NetworkPolicy.parse((), "full"))
    for ip in ("203.0.113.10", "198.51.100.1", "2001:db8::1", "::ffff:203.0.113.10"):
        assert decider.check_connect(ip, 443).allowed, ip


def test_special_reasons_say_why_and_the_fix():
    decider = Decider(NetworkPolicy.parse((), "full"))
    reason = decider.check_connect("127.0.0.1", 80).reason
    assert "loopback (RFC 6890)" in reason and "address rule" in reason
    assert "127.0.0.1:80" in reason
    assert "link-local" in decider.check_connect("169.254.169.254", 80).reason
    assert "private" in decider.check_connect("192.168.1.1", 80).reason


def test_ipv4_mapped_ipv6_is_judged_as_ipv4():
    full = Decider(NetworkPolicy.parse((), "full"))
    assert not full.check_connect("::ffff:127.0.0.1", 80).allowed
    assert "loopback" in full.check_connect("::ffff:127.0.0.1", 80).reason
    assert not full.check_connect("::ffff:169.254.169.254", 80).allowed
    assert full.check_connect("::ffff:203.0.113.10", 80).allowed
    # an IPv4 rule covers the mapped form of its address
    named = Decider(NetworkPolicy.parse(["127.0.0.1:80"], None))
    assert named.check_connect("::ffff:127.0.0.1", 80).allowed
    # and a name resolved to an IPv4 address counts for its mapped form
    rules = Decider(NetworkPolicy.parse(["svc.test"], None))
    rules.note_resolution("svc.test", ["203.0.113.10"])
    assert rules.check_connect("::ffff:203.0.113.10", 443).allowed


# -- address and name rules -------------------------------------------------------------------


def test_full_reaches_public_addresses_and_any_name():
    decider = Decider(NetworkPolicy.parse((), "full"))
    verdict = decider.check_connect("203.0.113.10", 8081)
    assert verdict.allowed and verdict.dial_ip == "203.0.113.10"
    assert verdict.rule == "--network full"
    assert decider.check_name("anything.example").allowed


def test_address_rule_port_only():
    decider = Decider(NetworkPolicy.parse(["203.0.113.10:8080"], None))
    assert decider.check_connect("203.0.113.10", 8080).rule == "203.0.113.10:8080"
    denied = decider.check_connect("203.0.113.10", 8081)
    assert not denied.allowed
    assert denied.reason.startswith("203.0.113.10:8081: no rule allows port 8081")
    assert not decider.check_connect("203.0.113.11", 8080).allowed
    loopback = Decider(NetworkPolicy.parse(["127.0.0.1:80"], None)).check_connect(
        "127.0.0.1", 81)
    assert not loopback.allowed and "no rule allows port 81" in loopback.reason


def test_cidr_rule():
    decider = Decider(NetworkPolicy.parse(["203.0.113.0/28", "[2001:db8::/32]:443"], None))
    assert decider.check_connect("203.0.113.15", 1).allowed
    assert not decider.check_connect("203.0.113.16", 1).allowed
    assert decider.check_connect("2001:db8::5", 443).allowed
    assert not decider.check_connect("2001:db8::5", 80).allowed
    assert not decider.check_connect("2001:db9::5", 443).allowed


def test_full_plus_address_rule_on_another_port_is_still_full():
    decider = Decider(NetworkPolicy.parse(["203.0.113.10:8080"], "full"))
    assert decider.check_connect("203.0.113.10", 8081).rule == "--network full"


def test_name_rule_needs_a_resolution_of_that_name():
    decider = Decider(NetworkPolicy.parse(["svc.test:8080"], None))
    first = decider.check_connect("203.0.113.10", 8080)
    assert not first.allowed and "no allowed name resolved to 203.0.113.10" in first.reason
    # a name read from the connection counts only once the host resolved it to this address
    claimed = decider.check_connect("203.0.113.10", 8080, ["svc.test"])
    assert not claimed.allowed and "svc.test" in claimed.reason
    decider.note_resolution("other.test", ["203.0.113.10"])
    assert not decider.check_connect("203.0.113.10", 8080).allowed
    assert decider.resolved_names("203.0.113.10") == set()  # no rule matches other.test
    decider.note_resolution("SVC.test.", ["203.0.113.10"])
    allowed = decider.check_connect("203.0.113.10", 8080)
    assert allowed.allowed and allowed.rule == "svc.test:8080"
    assert allowed.dial_ip == "203.0.113.10"
    denied = decider.check_connect("203.0.113.10", 8081)
    assert not denied.allowed and "no rule allows port 8081" in denied.reason
    assert not decider.check_connect("203.0.113.11", 8080).allowed
    assert decider.check_name("svc.test").allowed
    assert not decider.check_name("other.test").allowed


def test_name_and_address_rules_on_different_ports():
    decider = Decider(NetworkPolicy.parse(["203.0.113.10:8080", "svc.test:8081"], None))
    decider.note_resolution("svc.test", ["203.0.113.10"])
    assert decider.check_connect("203.0.113.10", 8080).rule == "203.0.113.10:8080"
    assert decider.check_connect("203.0.113.10", 8081).rule == "svc.test:8081"
    assert "port 8082" in decider.check_connect("203.0.113.10", 8082).reason


def test_wildcard_depth_and_boundaries():
    decider = Decider(NetworkPolicy.parse(["*.example.com"], None))
    for name in ("a.example.com", "a.b.example.com", "A.Example.COM."):
        assert decider.check_name(name).allowed, name
    for name in ("example.com", "badexample.com", "example.com.evil.test", "xexample.com"):
        assert not decider.check_name(name).allowed, name
    decider.note_resolution("deep.a.example.com", ["203.0.113.30"])
    decider.note_resolution("badexample.com", ["203.0.113.31"])
    assert decider.check_connect("203.0.113.30", 443).rule == "*.example.com"
    assert not decider.check_connect("203.0.113.31", 443).allowed


def test_idna_names():
    decider = Decider(NetworkPolicy.parse(["bücher.example"], None))
    assert decider.check_name("xn--bcher-kva.example").allowed
    assert decider.check_name("BÜCHER.example").allowed


def test_bad_names_are_denied_not_raised():
    decider = Decider(NetworkPolicy.parse((), "full"))
    for name in ("", "bad name", "a..b", "1.2.3.4", "-x.test"):
        assert not decider.check_name(name).allowed, name
    decider.note_resolution("bad name", ["203.0.113.1"])  # ignored, no raise
    assert not decider.check_connect("not-an-ip", 80).allowed


def test_host_alias():
    decider = Decider(NetworkPolicy.parse(["host.boxlite.internal:8000"], None))
    verdict = decider.check_connect(HOST_ALIAS_GUEST_IP, 8000)
    assert verdict.allowed and verdict.dial_ip == "127.0.0.1"
    assert verdict.rule == "host.boxlite.internal:8000"
    other = decider.check_connect(HOST_ALIAS_GUEST_IP, 8001)
    assert not other.allowed and "port 8001" in other.reason
    assert not decider.check_connect("127.0.0.1", 8000).allowed  # the real loopback: no
    assert decider.check_name("host.boxlite.internal").allowed
    full = Decider(NetworkPolicy.parse((), "full"))
    denied = full.check_connect(HOST_ALIAS_GUEST_IP, 8000)
    assert not denied.allowed and "host.boxlite.internal:8000" in denied.reason
    assert not full.check_name("host.boxlite.internal").allowed
    wildcard = Decider(NetworkPolicy.parse(["*.boxlite.internal"], None))
    assert not wildcard.check_name("host.boxlite.internal").allowed


def test_host_alias_wins_over_a_cidr_covering_its_address():
    decider = Decider(NetworkPolicy.parse(["10.0.0.0/8", "host.boxlite.internal:8000"], None))
    assert decider.check_connect(HOST_ALIAS_GUEST_IP, 8000).dial_ip == "127.0.0.1"
    assert decider.check_connect(HOST_ALIAS_GUEST_IP, 22).dial_ip == HOST_ALIAS_GUEST_IP


def test_none_denies_everything():
    decider = Decider(NetworkPolicy.parse((), None))
    for ip in ("203.0.113.10", "127.0.0.1", HOST_ALIAS_GUEST_IP, "2001:db8::1"):
        verdict = decider.check_connect(ip, 80, ["svc.test"])
        assert not verdict.allowed and "no network" in verdict.reason
        assert not decider.check_udp(ip, 53).allowed
    decider.note_resolution("svc.test", ["203.0.113.10"])
    assert not decider.check_connect("203.0.113.10", 80).allowed
    assert not decider.check_name("svc.test").allowed
    assert not decider.check_name("host.boxlite.internal").allowed


def test_udp_only_by_address_rules():
    decider = Decider(NetworkPolicy.parse(["svc.test", "203.0.113.0/28:123", "127.0.0.1:53"],
                                          None))
    decider.note_resolution("svc.test", ["203.0.113.20"])
    assert decider.check_udp("203.0.113.5", 123).rule == "203.0.113.0/28:123"
    assert not decider.check_udp("203.0.113.5", 124).allowed
    assert not decider.check_udp("203.0.113.20", 123).allowed  # a name rule: TCP only
    assert decider.check_udp("127.0.0.1", 53).allowed
    full = Decider(NetworkPolicy.parse((), "full"))
    assert "only an address or CIDR rule" in full.check_udp("203.0.113.5", 123).reason


def test_decider_is_thread_safe():
    decider = Decider(NetworkPolicy.parse(["*.test:443"], None))
    errors = []

    def note(n):
        for i in range(200):
            decider.note_resolution(f"h{n}-{i}.test", [f"203.0.113.{i % 250}"])

    def check():
        for i in range(200):
            try:
                decider.check_connect(f"203.0.113.{i % 250}", 443)
            except Exception as exc:  # pragma: no cover - the failure being tested for
                errors.append(exc)

    threads = [threading.Thread(target=f, args=a) for f, a in
               [(note, (n,)) for n in range(4)] + [(check, ()) for _ in range(4)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert decider.check_connect("203.0.113.199", 443).allowed
    assert len(decider.resolved_names("203.0.113.0")) == 4
