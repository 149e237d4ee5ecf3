"""What a box may connect to: rules, modes, and the decision for each connection and name.

A box has no network unless asked (``NetworkMode.NONE``). With rules (``ALLOWLIST``) it may
reach what they name; with ``FULL`` any public address. In every mode the special ranges of
RFC 6890 (loopback, private, link-local and cloud metadata, CGNAT, multicast, …;
:data:`SPECIAL_NETWORKS`) stay out of reach unless an address or CIDR rule covers the
destination itself: a name rule never reaches them, even when DNS says the name lives there
(DNS rebinding), and ``FULL`` does not either.

Rule forms (``--allow-net``), each with an optional ``:PORT`` (1-65535; none = any port):

* ``HOST`` — one name, e.g. ``pypi.org:443``. Case and a trailing dot do not matter;
  non-ASCII names are compared in their IDNA form.
* ``*.DOMAIN`` — every name under DOMAIN at any depth (``a.example.com``,
  ``a.b.example.com``), but NOT ``example.com`` itself: write both rules to allow both.
* ``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]:443`` — one address.
* ``10.0.0.0/8``, ``[2001:db8::/32]:443`` — a CIDR network. ``0.0.0.0/0`` covers every
  IPv4 address, special ones included: it is the way to say "really everything".
* ``host.boxlite.internal`` — the host's own 127.0.0.1, which the guest sees as
  :data:`HOST_ALIAS_GUEST_IP`.

The guest is untrusted, so every decision is made on the host (network/relay.py) from facts
the host holds: the destination address the guest asked for, the names the host's own
resolver answered for this box (``Decider.note_resolution``), and names read from the
connection's first bytes (TLS SNI or HTTP Host), which only count when the host's resolver
also maps that name to the destination.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

import attrs

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..jsontypes import JsonObject, JsonValue

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: the name the guest uses for the host (its 127.0.0.1), when a rule names it
HOST_ALIAS_NAME = "host.boxlite.internal"
#: the address the guest sees for the host; the relay dials :data:`HOST_ALIAS_DIAL_IP` instead
HOST_ALIAS_GUEST_IP = "10.0.2.2"
#: where the host connects for the host alias
HOST_ALIAS_DIAL_IP = "127.0.0.1"
#: the guest's own address and prefix (the same in every box: boxes never see each other)
GUEST_IP = "10.0.2.15"
GUEST_PREFIX = 24
#: the resolver address the container's /etc/resolv.conf names (served by the agent,
#: answered by the host's resolver.Resolver)
RESOLVER_GUEST_IP = "10.0.2.3"

#: Special-purpose ranges (RFC 6890 and its registry, plus multicast, the reserved 240/4 and
#: NAT64): a box reaches an address in one of them only through an address or CIDR rule that
#: covers it, in every mode. An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is judged as
#: its IPv4 address, so ``::ffff:203.0.113.1`` is public and ``::ffff:127.0.0.1`` loopback.
#: 203.0.113.0/24 (TEST-NET-3) is deliberately absent: tests use it as "the internet".
SPECIAL_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
        "169.254.0.0/16", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "::ffff:0:0/96",
        "64:ff9b::/96",
    )
)
_SPECIAL_WHY = {
    "0.0.0.0/8": "'this network'", "::/128": "the unspecified address",
    "127.0.0.0/8": "loopback", "::1/128": "loopback", "10.0.0.0/8": "private",
    "172.16.0.0/12": "private", "192.168.0.0/16": "private", "fc00::/7": "private",
    "169.254.0.0/16": "link-local (cloud metadata)", "fe80::/10": "link-local",
    "100.64.0.0/10": "shared address space (CGNAT)", "224.0.0.0/4": "multicast",
    "ff00::/8": "multicast", "240.0.0.0/4": "reserved", "198.18.0.0/15": "benchmarking",
    "192.0.0.0/24": "IETF protocol assignments", "64:ff9b::/96": "NAT64",
    "::ffff:0:0/96": "IPv4-mapped",
}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_FORMS = ("HOST[:PORT], *.DOMAIN[:PORT], IPv4[:PORT], IPv6, [IPv6]:PORT, CIDR[:PORT], "
          f"[IPv6-CIDR]:PORT or {HOST_ALIAS_NAME}[:PORT]")
_FULL_RULE = "--network full"
_ALIAS_IP = ipaddress.IPv4Address(HOST_ALIAS_GUEST_IP)


class RuleKind(enum.StrEnum):
    """What a rule names."""

    HOST = "host"  #: one name
    WILDCARD = "wildcard"  #: every name under a domain, at any depth (not the domain itself)
    ADDRESS = "address"  #: one IP address
    NETWORK = "network"  #: a CIDR network
    HOST_ALIAS = "host-alias"  #: the host's 127.0.0.1, as host.boxlite.internal


class NetworkMode(enum.StrEnum):
    """How much network a box has (``--network``)."""

    NONE = "none"  #: no network at all (the default)
    ALLOWLIST = "allowlist"  #: only what the rules name
    FULL = "full"  #: every public address, plus what the rules name


def _mapped(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` → ``a.b.c.d``; any other address unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def special_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is special (RFC 6890), e.g. "loopback"; None for a public address."""
    ip = _mapped(ip)
    for net in SPECIAL_NETWORKS:
        if ip.version == net.version and ip in net:
            return _SPECIAL_WHY.get(str(net), "special-purpose")
    return None


def normalise_name(name: str) -> str:
    """A DNS name as rules and the resolver compare it: lowercase, no trailing dot, IDNA
    (``xn--``) for non-ASCII labels.

    Raises:
        ValueError: not a host name (empty, a bad label, over 253 characters, or all-numeric
            last label, which is an address or a typo of one, never a name).
    """
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        name = name.encode("idna").decode("ascii")  # UnicodeError is a ValueError
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(p) for p in labels):
        raise ValueError(f"{name!r} is not a host name")
    if labels[-1].isdigit():
        raise ValueError(f"{name!r} is not a host name or an IP address")
    return name


@attrs.frozen
class Rule:
    """One ``--allow-net`` rule, as :func:`parse_rule` made it.

    ``text`` is what the user wrote (outer whitespace removed), ``name`` the normalised name
    for HOST/WILDCARD/HOST_ALIAS (for WILDCARD, the domain after ``*.``), ``network`` the
    address (a /32 or /128) or CIDR for ADDRESS/NETWORK, ``port`` None for any port.
    """

    text: str
    kind: RuleKind
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port

    def name_matches(self, name: str) -> bool:
        """Does this name rule match ``name`` (already normalised)? Address rules: never."""
        if self.kind in (RuleKind.HOST, RuleKind.HOST_ALIAS):
            return name == self.name
        if self.kind is RuleKind.WILDCARD:
            return name.endswith(f".{self.name}")
        return False

    def covers(self, ip: IPAddress) -> bool:
        """Does this address/CIDR rule cover ``ip`` (or, for ``::ffff:a.b.c.d``, a.b.c.d)?"""
        if self.network is None:
            return False
        return any(a.version == self.network.version and a in self.network
                   for a in {ip, _mapped(ip)})

    def __str__(self) -> str:
        return self.text


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"network rule {text!r}: {why}; accepted forms: {_FORMS}")


def _split_port(text: str, body: str) -> tuple[str, int | None]:
    """'x:443' → ('x', 443); IPv6 in brackets; a bare IPv6 address (2+ colons) has no port."""
    port_text = None
    if body.startswith("["):
        end = body.find("]")
        if end < 0:
            raise _bad(text, "an unclosed '['")
        rest = body[end + 1:]
        if rest and not rest.startswith(":"):
            raise _bad(text, "after ']' may only come ':PORT'")
        port_text = rest[1:] if rest else None
        body = body[1:end]
        if ":" not in body:
            raise _bad(text, "brackets are for IPv6 addresses only")
    elif body.count(":") == 1:
        body, port_text = body.split(":")
    if port_text is None:
        return body, None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _bad(text, f"port {port_text!r} is not a number 1-65535")
    return body, int(port_text)


def parse_rule(text: str) -> Rule:
    """One rule from its text; the forms are listed in the module docstring.

    Raises:
        ConfigError: anything else (empty, inner spaces, a URL, a bad port, ``*`` anywhere
            but a leading ``*.``, a bad address or CIDR), naming the rule and the forms.
    """
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "empty")
    raw = text.strip()
    if "://" in raw:
        raise _bad(text, "a rule is a host, address or network, not a URL")
    if any(c.isspace() for c in raw):
        raise _bad(text, "spaces are not allowed")
    body, port = _split_port(text, raw)
    if "/" in body:
        try:
            net = ipaddress.ip_network(body, strict=False)
        except ValueError:
            raise _bad(text, f"{body!r} is not a CIDR network") from None
        return Rule(text=raw, kind=RuleKind.NETWORK, network=net, port=port)
    try:
        address = ipaddress.ip_address(body)
    except ValueError:
        pass
    else:
        return Rule(text=raw, kind=RuleKind.ADDRESS, network=ipaddress.ip_network(address),
                    port=port)
    if ":" in body:
        raise _bad(text, f"{body!r} is not an IPv6 address (with a port: [IPv6]:PORT)")
    if body.startswith("*."):
        try:
            domain = normalise_name(body[2:])
        except ValueError:
            raise _bad(text, "after '*.' must come a domain name") from None
        return Rule(text=raw, kind=RuleKind.WILDCARD, name=domain, port=port)
    if "*" in body:
        raise _bad(text, "a wildcard may only be a leading '*.' (e.g. *.example.com)")
    try:
        name = normalise_name(body)
    except ValueError as exc:
        raise _bad(text, str(exc)) from None
    kind = RuleKind.HOST_ALIAS if name == HOST_ALIAS_NAME else RuleKind.HOST
    return Rule(text=raw, kind=kind, name=name, port=port)


def _check_rules(policy: NetworkPolicy, _attr: object, rules: tuple[Rule, ...]) -> None:
    if policy.mode is NetworkMode.NONE and rules:
        raise ConfigError("--network none with --allow-net rules: drop one of them")
    if policy.mode is NetworkMode.ALLOWLIST and not rules:
        raise ConfigError("--network allowlist needs at least one --allow-net RULE")


@attrs.frozen
class NetworkPolicy:
    """A box's network: a mode and its rules. :meth:`parse` builds one from CLI options."""

    mode: NetworkMode = attrs.field(default=NetworkMode.NONE, converter=NetworkMode)
    rules: tuple[Rule, ...] = attrs.field(default=(), converter=tuple, validator=_check_rules)

    @classmethod
    def parse(cls, allow: Sequence[str], network: str | None) -> NetworkPolicy:
        """From ``--allow-net`` rules and ``--network`` (None, "none", "allowlist", "full").

        Rules without a mode mean "allowlist"; "full" with rules is fine (address rules can
        then open special ranges). A single string is taken as one rule.

        Raises:
            ConfigError: a bad rule or mode name; "none" with rules; "allowlist" without.
        """
        if isinstance(allow, str):
            allow = [allow]
        rules = tuple(parse_rule(text) for text in allow)
        if network is None:
            mode = NetworkMode.ALLOWLIST if rules else NetworkMode.NONE
        else:
            try:
                mode = NetworkMode(network.strip().lower())
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"--network {network!r}: expected none, allowlist or full") from None
        return cls(mode=mode, rules=rules)

    @property
    def allows_host_alias(self) -> bool:
        """Does a rule name ``host.boxlite.internal`` (so the guest's hosts file lists it)?"""
        return any(r.kind is RuleKind.HOST_ALIAS for r in self.rules)

    @property
    def udp_networks(self) -> tuple[str, ...]:
        """The IPv4 networks an address or CIDR rule names ("203.0.113.0/28"): the only
        destinations UDP may go to (:meth:`Decider.check_udp` decides, per port). The guest
        redirects UDP to these alone and rejects the rest at once, so a program sending
        elsewhere fails fast instead of waiting for an answer the host will never relay."""
        return tuple(str(r.network) for r in self.rules
                     if r.network is not None and r.network.version == 4)

    @property
    def has_name_rules(self) -> bool:
        return any(r.kind in (RuleKind.HOST, RuleKind.WILDCARD) for r in self.rules)

    def to_json(self) -> JsonObject:
        """``{"mode": "allowlist", "rules": ["pypi.org:443", ...]}`` for the state db."""
        return {"mode": self.mode.value, "rules": [r.text for r in self.rules]}

    @classmethod
    def from_json(cls, data: Mapping[str, JsonValue]) -> NetworkPolicy:
        """The inverse of :meth:`to_json`.

        Raises:
            ConfigError: not that shape, or a rule that no longer parses.
        """
        rules = data.get("rules", [])
        mode = data.get("mode", NetworkMode.NONE.value)
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules) \
                or not isinstance(mode, str) or mode not in {m.value for m in NetworkMode}:
            raise ConfigError(f"network policy record {dict(data)!r}: expected "
                              '{"mode": "none"|"allowlist"|"full", "rules": [RULE, ...]}')
        return cls(mode=NetworkMode(mode), rules=tuple(parse_rule(t) for t in rules))

    def describe(self) -> str:
        """One line for ``inspect``, e.g. "allowlist: pypi.org:443, 10.0.0.0/8"."""
        if self.mode is NetworkMode.NONE:
            return "none (no network)"
        if self.mode is NetworkMode.FULL:
            extra = f", plus {', '.join(map(str, self.rules))}" if self.rules else ""
            return f"full (public addresses{extra})"
        return "allowlist: " + ", ".join(map(str, self.rules))


@attrs.frozen
class Verdict:
    """One decision.

    ``rule``: the text of the rule that allowed it ("--network full" for the mode), None for
    a deny. ``reason``: for a deny, a short human reason naming the destination, e.g.
    "203.0.113.10:8081: no rule allows port 8081". ``dial_ip``: where the host connects for
    an allowed connection (the destination, or 127.0.0.1 for the host alias); "" for a deny
    and for a name check.
    """

    allowed: bool
    reason: str = ""
    rule: str | None = None
    dial_ip: str = ""


def _deny(reason: str) -> Verdict:
    return Verdict(allowed=False, reason=reason)


def _allow(rule: str, dial_ip: str = "") -> Verdict:
    return Verdict(allowed=True, rule=rule, dial_ip=dial_ip)


class Decider:
    """Decisions for one box; remembers which addresses its allowed names resolved to.

    Thread-safe: the relay asks from a thread per connection and query. The memory of
    resolutions only grows for the box's lifetime (an address a name rule opened stays open:
    programs keep addresses far past a DNS TTL), and holds only names a HOST/WILDCARD rule
    matches, so ``FULL`` without name rules remembers nothing.
    """

    def __init__(self, policy: NetworkPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._resolved: dict[IPAddress, set[str]] = {}  # address → names that resolved to it
        self._name_rules = tuple(r for r in policy.rules
                                 if r.kind in (RuleKind.HOST, RuleKind.WILDCARD))
        self._alias_rules = tuple(r for r in policy.rules if r.kind is RuleKind.HOST_ALIAS)
        self._address_rules = tuple(r for r in policy.rules if r.network is not None)

    def note_resolution(self, name: str, addresses: Sequence[str]) -> None:
        """The host's resolver answered ``addresses`` (IP strings) for ``name``.

        From then on a connection to one of those addresses counts as a connection to that
        name. Names no HOST/WILDCARD rule matches are ignored (they open nothing), and so
        are strings that are not a name or not an address.
        """
        try:
            name = normalise_name(name)
        except ValueError:
            return
        if not any(r.name_matches(name) for r in self._name_rules):
            return
        parsed = []
        for address in addresses:
            try:
                parsed.append(_mapped(ipaddress.ip_address(address)))
            except ValueError:
                continue
        with self._lock:
            for ip in parsed:
                self._resolved.setdefault(ip, set()).add(name)

    def resolved_names(self, ip: str) -> set[str]:
        """The allowed names the host's resolver returned ``ip`` for, so far."""
        try:
            address = _mapped(ipaddress.ip_address(ip))
        except ValueError:
            return set()
        with self._lock:
            return set(self._resolved.get(address, ()))

    def check_name(self, name: str) -> Verdict:
        """May the host resolve ``name`` for the guest?

        ``FULL``: any name; ``ALLOWLIST``: a name some HOST, WILDCARD or HOST_ALIAS rule
        matches (on any port); ``NONE``: none. ``host.boxlite.internal`` resolves only with
        a HOST_ALIAS rule, in every mode.
        """
        try:
            name = normalise_name(name)
        except ValueError as exc:
            return _deny(str(exc))
        if self.policy.mode is NetworkMode.NONE:
            return _deny(f"{name}: the box has no network")
        if name == HOST_ALIAS_NAME:
            if self._alias_rules:
                return _allow(self._alias_rules[0].text)
            return _deny(f"{name}: allow it with a rule '{HOST_ALIAS_NAME}:PORT'")
        for rule in self._name_rules:
            if rule.name_matches(name):
                return _allow(rule.text)
        if self.policy.mode is NetworkMode.FULL:
            return _allow(_FULL_RULE)
        return _deny(f"{name}: no rule names it")

    def check_connect(self, ip: str, port: int, names: Sequence[str] = ()) -> Verdict:
        """May the guest's TCP connection to ``ip:port`` go ahead, and where to dial?

        Allowed, in this order of precedence, when:

        1. ``ip`` is :data:`HOST_ALIAS_GUEST_IP` and a HOST_ALIAS rule allows ``port``
           (``dial_ip`` is then 127.0.0.1);
        2. an ADDRESS/NETWORK rule covers ``ip`` and allows ``port``: the only way into a
           special range (:data:`SPECIAL_NETWORKS`);
        3. ``ip`` is not special, and a HOST/WILDCARD rule allowing ``port`` matches a name
           the host's resolver returned ``ip`` for (:meth:`note_resolution`);
        4. the mode is ``FULL`` and ``ip`` is not special.

        A name rule never reaches a special address, even when the host's resolver says the
        name lives there: that is DNS rebinding (a public name pointed at 127.0.0.1 or at
        169.254.169.254, the cloud metadata service).

        ``names`` are names the host read from the connection's first bytes (TLS SNI, HTTP
        Host; sniff.peek_names). Contract: before calling, the caller resolves each with the
        host's resolver (``Resolver.resolve``, which notes the resolution), so a sniffed
        name counts only if the host itself maps it to ``ip`` — a guest cannot open an
        address by claiming a name in its ClientHello. ``names`` then only shape the reason
        of a deny.
        """
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return _deny(f"{ip!r} is not an IP address")
        target = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        if self.policy.mode is NetworkMode.NONE:
            return _deny(f"{target}: the box has no network")
        port_rule: Rule | None = None  # a rule for this destination, on another port

        is_alias = _mapped(address) == _ALIAS_IP
        if is_alias:
            for rule in self._alias_rules:
                if rule.port_matches(port):
                    return _allow(rule.text, HOST_ALIAS_DIAL_IP)
                port_rule = rule
        for rule in self._address_rules:
            if rule.covers(address):
                if rule.port_matches(port):
                    return _allow(rule.text, str(address))
                port_rule = port_rule or rule
        why = special_reason(address)
        if port_rule is not None and (is_alias or why is not None):
            return _deny(f"{target}: no rule allows port {port} (rule {port_rule} names "
                         "another port)")
        if is_alias:
            return _deny(f"{target} is the host: allow it with a rule "
                         f"'{HOST_ALIAS_NAME}:{port}'")
        if why is not None:
            return _deny(f"{address} is {why} (RFC 6890); allow it with an address rule, "
                         f"e.g. --allow-net {target}")

        known = self.resolved_names(str(address))
        for rule in self._name_rules:
            if any(rule.name_matches(name) for name in known):
                if rule.port_matches(port):
                    return _allow(rule.text, str(address))
                port_rule = port_rule or rule
        if self.policy.mode is NetworkMode.FULL:
            return _allow(_FULL_RULE, str(address))
        if port_rule is not None:
            return _deny(f"{target}: no rule allows port {port} (rule {port_rule} names "
                         "another port)")
        if names:
            return _deny(f"{target}: {', '.join(names)} is not allowed, or the host does not "
                         f"resolve it to {address}")
        return _deny(f"{target}: no rule allows it (no allowed name resolved to {address} "
                     "for this box)")

    def check_udp(self, ip: str, port: int) -> Verdict:
        """May the guest send UDP to ``ip:port``? Only an ADDRESS/NETWORK rule covering it
        allows that, in every mode (DNS to the box's resolver is answered elsewhere)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return _deny(f"{ip!r} is not an IP address")
        if self.policy.mode is NetworkMode.NONE:
            return _deny(f"udp {address}:{port}: the box has no network")
        for rule in self._address_rules:
            if rule.covers(address) and rule.port_matches(port):
                return _allow(rule.text, str(address))
        return _deny(f"udp {address}:{port}: only an address or CIDR rule allows UDP")
