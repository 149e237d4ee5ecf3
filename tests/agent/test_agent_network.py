"""The guest side's pure parts: the REFUSED answer for queries no host listens for, and the
rules and device setup it hands to `nft` and `ip` (the VM tests run them for real)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode

from boxlite_core.agent.network import (
    CATCH_PORT,
    UDP_CATCH_PORT,
    ip_batch,
    nft_ruleset,
    refused_answer,
    udp_original_destination,
)


def test_refused_answer_is_a_refused_response_to_that_query():
    query = dns.message.make_query("svc.test", "A")
    answer = dns.message.from_wire(refused_answer(query.to_wire()))
    assert answer.id == query.id and answer.flags & dns.flags.QR
    assert answer.rcode() == dns.rcode.REFUSED
    assert answer.question == query.question
    assert refused_answer(b"\x00" * 11) == b""


def test_ruleset_redirects_tcp_only_with_egress():
    with_egress = nft_ruleset("10.0.2.3", "10.0.2.15", egress=True)
    assert f"redirect to :{CATCH_PORT}" in with_egress
    assert "ip daddr 127.0.0.0/8 return" in with_egress
    without = nft_ruleset("10.0.2.3", "10.0.2.15", egress=False)
    assert "redirect" not in without and "reject" in without
    for rules in (with_egress, without):  # IPv6 and non-TCP always rejected
        assert "table ip6 boxlite6" in rules and "reject with icmpv6" in rules


def test_ip_batch_renames_the_modules_dummy0():
    assert "link set dummy0 name eth0" in ip_batch("10.0.2.15/24", "10.0.2.3", have_dummy0=True)
    made = ip_batch("10.0.2.15/24", "10.0.2.3", have_dummy0=False)
    assert "link add eth0 type dummy" in made and "route add default dev eth0" in made


def test_udp_is_redirected_only_towards_address_rules():
    rules = nft_ruleset("10.0.2.3", "10.0.2.15", egress=True,
                        udp_networks=["203.0.113.10/32", "198.51.100.0/24"])
    assert (f"meta l4proto udp ip daddr {{ 203.0.113.10/32, 198.51.100.0/24 }} redirect to "
            f":{UDP_CATCH_PORT}") in rules
    # no address rule: no UDP redirect at all, so UDP is rejected in the guest at once
    assert "l4proto udp" not in nft_ruleset("10.0.2.3", "10.0.2.15", egress=True)
    assert "l4proto udp" not in nft_ruleset("10.0.2.3", "10.0.2.15", egress=False,
                                            udp_networks=["203.0.113.10/32"])


#: /proc/net/nf_conntrack lines as a 6.1 kernel writes them (accounting off and on)
CONNTRACK = "".join(line + "\n" for line in (
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.2.15 dst=203.0.113.10 sport=40000 "
    "dport=8080 src=127.0.0.1 dst=10.0.2.15 sport=15001 dport=40000 [ASSURED] mark=0 use=2",
    "ipv4     2 udp      17 28 src=10.0.2.15 dst=203.0.113.10 sport=40000 dport=53 "
    "[UNREPLIED] src=127.0.0.1 dst=10.0.2.15 sport=15002 dport=40000 mark=0 zone=0 use=2",
    "ipv4     2 udp      17 170 src=10.0.2.15 dst=198.51.100.7 sport=41000 dport=123 "
    "packets=1 bytes=76 src=127.0.0.1 dst=10.0.2.15 sport=15002 dport=41000 packets=1 "
    "bytes=76 [ASSURED] mark=0 zone=0 use=2",
    "ipv4     2 udp      17 20 src=10.0.2.15 dst=10.0.2.3 sport=42000 dport=53 src=10.0.2.3 "
    "dst=10.0.2.15 sport=53 dport=42000 mark=0 zone=0 use=2",
))


def test_udp_original_destination_from_conntrack(tmp_path):
    table = tmp_path / "nf_conntrack"
    table.write_text(CONNTRACK)
    lookup = lambda peer: udp_original_destination(peer, str(table))  # noqa: E731
    assert lookup(("10.0.2.15", 40000)) == ("203.0.113.10", 53)  # not the TCP entry's 8080
    assert lookup(("10.0.2.15", 41000)) == ("198.51.100.7", 123)  # with accounting fields
    assert lookup(("10.0.2.15", 42000)) is None  # DNS to the resolver is not redirected
    assert lookup(("10.0.2.15", 43000)) is None
    assert udp_original_destination(("10.0.2.15", 40000), str(tmp_path / "missing")) is None


def test_udp_networks_are_the_ipv4_address_rules():
    from boxlite_core.network.policy import NetworkPolicy

    policy = NetworkPolicy.parse(["svc.test", "203.0.113.10:53", "198.51.100.0/24",
                                  "2001:db8::/32", "*.example.com"], None)
    assert policy.udp_networks == ("203.0.113.10/32", "198.51.100.0/24")
    assert NetworkPolicy.parse((), "full").udp_networks == ()
