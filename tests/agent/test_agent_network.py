"""The guest side's pure parts: the REFUSED answer for queries no host listens for, and the
rules and device setup it hands to `nft` and `ip` (the VM tests run them for real)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode

from boxlite_core.agent.network import CATCH_PORT, ip_batch, nft_ruleset, refused_answer


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
