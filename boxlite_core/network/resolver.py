"""The host-side resolver a box's DNS queries go to: it resolves only names the policy allows.

The guest's resolver address (``RESOLVER_GUEST_IP``) is served by the agent, which hands each
query's wire bytes to the host; here dnspython parses it, the box's ``Decider`` says whether
the name may be resolved, and the answer is built with dnspython. Every address handed out is
noted in the Decider: a name rule lets the box connect only to addresses this resolver gave
it. IPv6 is off (AAAA answers are empty), so a box only ever connects over IPv4.

A name the policy does not allow is never sent upstream: a guest must not be able to make
the host query names it chose (DNS tunnelling out of an allowlist).

Tests point the resolver at a hosts file (``BOXLITE_NET_HOSTS``): then names are answered from
that file only, and nothing goes to the network.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from ..errors import ConfigError
from .policy import HOST_ALIAS_GUEST_IP, HOST_ALIAS_NAME, Decider, normalise_name

#: environment variable naming a hosts-format file the resolver answers from (tests)
HOSTS_ENV = "BOXLITE_NET_HOSTS"
#: seconds the guest may cache an answer (and the host caches an upstream one)
ANSWER_TTL = 30
#: seconds a real resolution may take before the guest gets SERVFAIL
RESOLVE_TIMEOUT = 5.0
#: cached upstream answers kept before expired ones are swept
_CACHE_SWEEP_AT = 1024
#: bytes of a DNS header (RFC 1035 4.1.1): the least a query must have to be answered at all
_HEADER = 12

#: receives one line per answer (the relay writes them to the box's network.log)
EventSink = Callable[[str], None]


class ResolveError(Exception):
    """The name could not be resolved; ``rcode`` is what the guest gets (NXDOMAIN for no
    such name, NOERROR for a name without an IPv4 address, SERVFAIL for a timeout)."""

    def __init__(self, message: str, rcode: dns.rcode.Rcode) -> None:
        super().__init__(message)
        self.rcode = rcode


def read_hosts(path: Path) -> dict[str, tuple[str, ...]]:
    """A hosts-format file (``ADDRESS NAME...``, ``#`` comments) → normalised name → IPv4
    addresses in file order. IPv6 lines and unreadable entries are skipped.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"hosts file {path} ({HOSTS_ENV}): {exc.strerror or exc}; "
                          "point it at a readable hosts-format file or unset it") from None
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if address.version != 4:
            continue
        for name in fields[1:]:
            try:
                table.setdefault(normalise_name(name), []).append(str(address))
            except ValueError:
                continue
    return {k: tuple(v) for k, v in table.items()}


class Resolver:
    """Answers one box's DNS queries (:meth:`answer`) and resolves names for the relay
    (:meth:`resolve`).

    ``hosts_file``: answer from that file only, never the network. Otherwise names go to
    ``upstream`` (default: a dnspython resolver from the system's configuration, made on
    first use), A records only, ``timeout_s`` seconds per name. ``on_event`` gets a line per
    answered query. Thread-safe.
    """

    def __init__(self, decider: Decider, hosts_file: Path | None = None,
                 timeout_s: float = RESOLVE_TIMEOUT, on_event: EventSink | None = None,
                 upstream: dns.resolver.Resolver | None = None) -> None:
        self.decider = decider
        self.hosts: Mapping[str, tuple[str, ...]] | None = (
            read_hosts(hosts_file) if hosts_file is not None else None)
        self.timeout_s = timeout_s
        self.on_event = on_event
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._upstream = upstream

    @classmethod
    def from_env(cls, decider: Decider, on_event: EventSink | None = None) -> Resolver:
        """The resolver the relay uses: with ``BOXLITE_NET_HOSTS`` set, one answering from
        that file only; otherwise one using the system's DNS.

        Raises:
            ConfigError: ``BOXLITE_NET_HOSTS`` names a file that cannot be read.
        """
        hosts = os.environ.get(HOSTS_ENV)
        return cls(decider, Path(hosts) if hosts else None, on_event=on_event)

    def _event(self, line: str) -> None:
        if self.on_event is not None:
            self.on_event(line)

    def _upstream_resolver(self) -> dns.resolver.Resolver:
        with self._lock:
            if self._upstream is None:
                try:
                    self._upstream = dns.resolver.Resolver()
                except dns.exception.DNSException as exc:  # no /etc/resolv.conf, …
                    raise ResolveError(f"no system resolver: {exc}", dns.rcode.SERVFAIL
                                       ) from None
            return self._upstream

    def _lookup(self, name: str) -> tuple[str, ...]:
        """IPv4 addresses of normalised ``name`` (hosts file or upstream DNS; upstream
        answers are cached for :data:`ANSWER_TTL` seconds). Does not consult the policy.

        Raises:
            ResolveError: no such name, no IPv4 address, or no answer in time.
        """
        if name == HOST_ALIAS_NAME:
            return (HOST_ALIAS_GUEST_IP,)
        if self.hosts is not None:
            found = self.hosts.get(name)
            if not found:
                raise ResolveError(f"{name}: not in the {HOSTS_ENV} file", dns.rcode.NXDOMAIN)
            return found
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] > now:
                return hit[1]
        upstream = self._upstream_resolver()
        try:
            answer = upstream.resolve(name + ".", "A", lifetime=self.timeout_s)
        except dns.resolver.NXDOMAIN:
            raise ResolveError(f"{name}: no such name", dns.rcode.NXDOMAIN) from None
        except dns.resolver.NoAnswer:
            raise ResolveError(f"{name}: no IPv4 address", dns.rcode.NOERROR) from None
        except dns.exception.DNSException as exc:  # timeout, no nameserver answered, …
            raise ResolveError(f"{name}: {exc}", dns.rcode.SERVFAIL) from None
        addresses = tuple(r.address for r in answer)
        with self._lock:
            if len(self._cache) >= _CACHE_SWEEP_AT:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[name] = (now + ANSWER_TTL, addresses)
        return addresses

    def resolve(self, name: str) -> tuple[str, ...]:
        """The IPv4 addresses of ``name`` if the policy allows resolving it, noted in the
        Decider; () if it is not a name, not allowed (then nothing is looked up at all) or
        does not resolve. The relay calls this for names sniffed from a connection before
        ``Decider.check_connect``."""
        try:
            name = normalise_name(name)
        except ValueError:
            return ()
        if not self.decider.check_name(name).allowed:
            return ()
        try:
            addresses = self._lookup(name)
        except ResolveError:
            return ()
        self.decider.note_resolution(name, addresses)
        return addresses

    def answer(self, query: bytes) -> bytes:
        """The response to one DNS query, both in wire format (RFC 1035).

        A questions of allowed names get A records (TTL :data:`ANSWER_TTL`); AAAA and other
        types of an allowed name NOERROR with no records (NXDOMAIN if the name does not
        exist); names not allowed NXDOMAIN; a failed resolution SERVFAIL; an opcode other
        than QUERY NOTIMP; a class other than IN REFUSED. A message that does not parse but
        has a header gets FORMERR; fewer than 12 bytes, or a response rather than a query,
        gets b"" (the agent then drops it).
        """
        try:
            message = dns.message.from_wire(query)
        except Exception:  # dnspython raises many types on garbage; none may escape
            return self._formerr(query)
        if message.flags & dns.flags.QR:
            return b""
        response = dns.message.make_response(message)
        response.flags |= dns.flags.RA
        if message.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            self._event(f"DNS-DENY opcode {dns.opcode.to_text(message.opcode())}: not a query")
            return response.to_wire()
        if len(message.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            self._event(f"DNS-DENY {len(message.question)} questions in one query")
            return response.to_wire()
        question = message.question[0]
        name = question.name.to_text(omit_final_dot=True)
        qtype = dns.rdatatype.to_text(question.rdtype)
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            self._event(f"DNS-DENY {name} {qtype}: class "
                        f"{dns.rdataclass.to_text(question.rdclass)} is not served")
            return response.to_wire()
        verdict = self.decider.check_name(name)
        if not verdict.allowed:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._event(f"DNS-DENY {name} {qtype}: {verdict.reason}")
            return response.to_wire()
        canonical = normalise_name(name)  # check_name allowed it, so it normalises
        try:
            addresses = self._lookup(canonical)
        except ResolveError as exc:
            response.set_rcode(exc.rcode)
            self._event(f"DNS-FAIL {name} {qtype}: {exc} ({dns.rcode.to_text(exc.rcode)})")
            return response.to_wire()
        self.decider.note_resolution(canonical, addresses)
        if question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text_list(
                question.name, ANSWER_TTL, dns.rdataclass.IN, dns.rdatatype.A,
                list(addresses)))
            self._event(f"DNS {name} A -> {', '.join(addresses)} (rule {verdict.rule})")
        else:
            why = "IPv6 is off" if question.rdtype == dns.rdatatype.AAAA else "A only"
            self._event(f"DNS {name} {qtype} -> no records ({why}; rule {verdict.rule})")
        return response.to_wire()

    def _formerr(self, query: bytes) -> bytes:
        """FORMERR for an unparsable query whose header is readable; b"" otherwise."""
        if len(query) < _HEADER:
            self._event(f"DNS-DROP {len(query)} bytes: too short for a DNS header")
            return b""
        flags = int.from_bytes(query[2:4], "big")
        if flags & dns.flags.QR:
            return b""
        response = dns.message.Message(id=int.from_bytes(query[0:2], "big"))
        response.flags = dns.flags.QR | dns.flags.RA | (flags & dns.flags.RD)
        response.set_rcode(dns.rcode.FORMERR)
        self._event(f"DNS-FORMERR id {response.id}: the query does not parse")
        return response.to_wire()
