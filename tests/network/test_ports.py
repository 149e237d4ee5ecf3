"""docker's -p forms, their JSON and their display."""

from __future__ import annotations

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.network.ports import PortMapping, parse_port


@pytest.mark.parametrize(("spec", "ip", "host", "guest"), [
    ("8080:80", "127.0.0.1", 8080, 80),
    ("8080:80/tcp", "127.0.0.1", 8080, 80),
    ("8080:80/TCP", "127.0.0.1", 8080, 80),
    (" 8080:80 ", "127.0.0.1", 8080, 80),
    ("0.0.0.0:8080:80", "0.0.0.0", 8080, 80),
    ("127.0.0.1:0:8000", "127.0.0.1", 0, 8000),  # 0: any free host port
    ("[::1]:8080:80", "::1", 8080, 80),
    ("[::]:65535:65535/tcp", "::", 65535, 65535),
    ("[2001:DB8::1]:1:1", "2001:db8::1", 1, 1),
])
def test_forms(spec, ip, host, guest):
    mapping = parse_port(spec)
    assert (mapping.host_ip, mapping.host_port, mapping.guest_port, mapping.protocol) == \
        (ip, host, guest, "tcp")
    assert PortMapping.from_json(mapping.to_json()) == mapping


def test_str_is_dockers():
    assert str(parse_port("8080:80")) == "127.0.0.1:8080->80/tcp"
    assert str(parse_port("0.0.0.0:8080:80")) == "0.0.0.0:8080->80/tcp"
    assert str(parse_port("[::1]:1:2")) == "[::1]:1->2/tcp"


def test_json_shape():
    assert parse_port("8080:80").to_json() == {"host_ip": "127.0.0.1", "host_port": 8080,
                                               "guest_port": 80, "protocol": "tcp"}
    assert PortMapping.from_json({"host_port": 1, "guest_port": 2}) == \
        PortMapping(host_port=1, guest_port=2)


@pytest.mark.parametrize("spec", [
    "80", "8080:80:90:1", "a:80", "8080:0", "70000:80", "8080:-1", "8080:٨٠",
    "host:8080:80", "[::1:8080:80", "[::1]8080:80", "[::1]:8080", "", "8080:80/",
])
def test_bad_forms(spec):
    with pytest.raises(ConfigError) as err:
        parse_port(spec)
    assert repr(spec) in str(err.value)


def test_udp_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="only tcp ports are published"):
        parse_port("5353:53/udp")


@pytest.mark.parametrize("kwargs", [
    {"host_port": 70000, "guest_port": 80}, {"host_port": 80, "guest_port": 0},
    {"host_port": -1, "guest_port": 80}, {"host_port": True, "guest_port": 80},
    {"host_port": 80, "guest_port": 80, "host_ip": "localhost"},
    {"host_port": 80, "guest_port": 80, "protocol": "udp"},
])
def test_mapping_checks_itself(kwargs):
    with pytest.raises(ConfigError):
        PortMapping(**kwargs)


@pytest.mark.parametrize("data", [
    {"guest_port": 80}, {"host_port": "8080", "guest_port": 80},
    {"host_port": 8080, "guest_port": 80, "host_ip": 1},
    {"host_port": 8080, "guest_port": 80, "protocol": "udp"},
])
def test_from_bad_json(data):
    with pytest.raises(ConfigError):
        PortMapping.from_json(data)
