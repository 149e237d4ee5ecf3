"""Published ports: docker's ``-p [HOSTIP:]HOSTPORT:GUESTPORT[/tcp]``.

The box's relay listens on HOSTIP:HOSTPORT (127.0.0.1 unless an address is given: publishing
on every interface must be asked for, e.g. ``0.0.0.0:8080:80``; an IPv6 address goes in
brackets, ``[::1]:8080:80``) and carries each connection to GUESTPORT on the box's loopback
through the agent channel. HOSTPORT 0 lets the kernel pick a free port; ``boxlite port BOX``
and ``inspect`` show the one it picked. TCP only: the relay carries streams, not datagrams.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..jsontypes import JsonObject, JsonValue

_FORM = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp], e.g. 8080:80 or 0.0.0.0:8080:80"


def _check_host_ip(_inst: object, _attr: object, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"published port: host address {value!r} is not an IP address; "
                          f"form: {_FORM}") from None


def _port_range(low: int, what: str) -> Callable[[object, object, int], None]:
    def check(_inst: object, _attr: object, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
            raise ConfigError(f"published port: {what} {value!r} is not {low}-65535; "
                              f"form: {_FORM}")
    return check


def _check_protocol(_inst: object, _attr: object, value: str) -> None:
    if value != "tcp":
        raise ConfigError(f"published port: protocol {value!r}: only tcp ports are published")


@attrs.frozen
class PortMapping:
    """One published port: the relay's listener ``host_ip:host_port`` → the box's
    ``guest_port``. ``host_port`` 0: any free port (the relay reports the one it bound).

    Raises (at construction):
        ConfigError: a port out of range, a host address that is not an IP, not tcp.
    """

    host_port: int = attrs.field(validator=_port_range(0, "host port"))
    guest_port: int = attrs.field(validator=_port_range(1, "box port"))
    host_ip: str = attrs.field(default="127.0.0.1", validator=_check_host_ip)
    protocol: str = attrs.field(default="tcp", validator=_check_protocol)

    def to_json(self) -> JsonObject:
        """``{"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol":
        "tcp"}``, for the state db and the relay's config."""
        return {"host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port, "protocol": self.protocol}

    @classmethod
    def from_json(cls, data: Mapping[str, JsonValue]) -> PortMapping:
        """The inverse of :meth:`to_json`.

        Raises:
            ConfigError: not that shape, or values a PortMapping refuses.
        """
        host_port, guest_port = data.get("host_port"), data.get("guest_port")
        host_ip, protocol = data.get("host_ip", "127.0.0.1"), data.get("protocol", "tcp")
        if not isinstance(host_port, int) or not isinstance(guest_port, int) \
                or not isinstance(host_ip, str) or not isinstance(protocol, str):
            raise ConfigError(f"published port record {dict(data)!r}: expected "
                              '{"host_ip": IP, "host_port": N, "guest_port": N, '
                              '"protocol": "tcp"}')
        return cls(host_ip=host_ip, host_port=host_port, guest_port=guest_port,
                   protocol=protocol)

    def __str__(self) -> str:
        """docker's form: ``127.0.0.1:8080->80/tcp``, ``[::1]:8080->80/tcp``."""
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{host}:{self.host_port}->{self.guest_port}/{self.protocol}"


def _port(text: str, what: str, spec: str, *, low: int) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        raise ConfigError(f"-p {spec!r}: {what} {text!r} is not a number {low}-65535; "
                          f"form: {_FORM}")
    return int(text)


def parse_port(spec: str) -> PortMapping:
    """One ``-p`` value, e.g. ``8080:80``, ``0.0.0.0:8080:80/tcp``, ``[::1]:0:80``.

    Raises:
        ConfigError: not that form, a bad port or address, or a protocol other than tcp.
    """
    text = spec.strip()
    if "/" in text:
        text, protocol = text.rsplit("/", 1)
        if protocol.lower() != "tcp":
            raise ConfigError(f"-p {spec!r}: only tcp ports are published (not "
                              f"{protocol!r}); drop the /{protocol}")
    host_ip = "127.0.0.1"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ConfigError(f"-p {spec!r}: an IPv6 host address goes in brackets, then "
                              f"':'; form: {_FORM}")
        host_ip, text = text[1:end], text[end + 2:]
        parts = text.split(":")
        if len(parts) != 2:
            raise ConfigError(f"-p {spec!r}: expected HOSTPORT:GUESTPORT after the address; "
                              f"form: {_FORM}")
    else:
        parts = text.split(":")
        if len(parts) == 3:
            host_ip = parts.pop(0)
        elif len(parts) != 2:
            raise ConfigError(f"-p {spec!r}: give HOSTPORT:GUESTPORT (boxlite picks no host "
                              f"port by itself; use 0 for any free one); form: {_FORM}")
    try:
        host_ip = str(ipaddress.ip_address(host_ip))
    except ValueError:
        raise ConfigError(f"-p {spec!r}: {host_ip!r} is not an IP address; form: {_FORM}"
                          ) from None
    return PortMapping(host_ip=host_ip,
                       host_port=_port(parts[0], "host port", spec, low=0),
                       guest_port=_port(parts[1], "box port", spec, low=1))
