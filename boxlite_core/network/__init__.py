"""Box networking, host side.

The guest has no network device: its agent hands every TCP connection and DNS query the
container makes to the host, which decides and, if allowed, connects from its own sockets.
Here: the policy (``policy``: rules, modes, the Decider), the resolver that answers a box's
DNS (``resolver``), the names a connection's first bytes announce (``sniff``), published
ports (``ports``), and the per-box relay process that applies all of it (``relay``, started
and stopped by ``relayctl``). The guest side is agent/network.py.

Only the light policy and port names are re-exported: importing the package (as the
process starting a box does, for ``relayctl``) must not pull in dnspython, tlslite-ng and h11,
which only the relay needs; import ``resolver`` and ``sniff`` by module.
"""

from __future__ import annotations

from .policy import (
    GUEST_IP,
    GUEST_PREFIX,
    HOST_ALIAS_GUEST_IP,
    HOST_ALIAS_NAME,
    RESOLVER_GUEST_IP,
    SPECIAL_NETWORKS,
    Decider,
    NetworkMode,
    NetworkPolicy,
    Rule,
    RuleKind,
    Verdict,
    parse_rule,
)
from .ports import PortMapping, parse_port

__all__ = [
    "GUEST_IP",
    "GUEST_PREFIX",
    "HOST_ALIAS_GUEST_IP",
    "HOST_ALIAS_NAME",
    "RESOLVER_GUEST_IP",
    "SPECIAL_NETWORKS",
    "Decider",
    "NetworkMode",
    "NetworkPolicy",
    "PortMapping",
    "Rule",
    "RuleKind",
    "Verdict",
    "parse_port",
    "parse_rule",
]
