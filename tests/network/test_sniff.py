"""Names from a connection's first bytes: TLS SNI (a real ClientHello from Python's ssl)
and the HTTP Host header; partial input asks for more; garbage never raises."""

from __future__ import annotations

import random
import ssl

import pytest

from boxlite_core.network.sniff import SniffResult, peek_names


def client_hello(server_hostname: str | None = "svc.test") -> bytes:
    """The first flight of a real TLS client: one handshake record holding a ClientHello."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, at: int) -> bytes:
    """The same ClientHello carried in two handshake records (legal, if rare)."""
    header, payload = hello[:3], hello[5:]
    first, second = payload[:at], payload[at:]
    return (header + len(first).to_bytes(2, "big") + first
            + header + len(second).to_bytes(2, "big") + second)


def test_tls_sni():
    hello = client_hello("svc.test")
    assert hello[0] == 22 and hello[5] == 1
    assert peek_names(hello) == SniffResult(names=("svc.test",), complete=True)
    assert peek_names(hello + b"more bytes after the hello").names == ("svc.test",)
    assert peek_names(client_hello("Mixed.Case.Test")).names == ("mixed.case.test",)


def test_every_truncated_hello_asks_for_more():
    hello = client_hello("svc.test")
    for cut in range(1, len(hello)):
        assert peek_names(hello[:cut]) == SniffResult(complete=False), cut


def test_hello_split_over_records():
    hello = client_hello("svc.test")
    for at in (1, 3, 4, 50, len(hello) - 6):
        joined = split_records(hello, at)
        assert peek_names(joined).names == ("svc.test",), at
        for cut in range(1, len(joined)):
            assert not peek_names(joined[:cut]).complete, (at, cut)


def test_tls_without_sni():
    result = peek_names(client_hello(None))
    assert result.complete and result.names == ()


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello, not a ClientHello
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert record
    b"\x16\x03\x01\x00\x00",  # an empty handshake record
    b"\x16\x02\x00",  # not TLS 1.x
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff",  # a ClientHello of garbage
    b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a ClientHello claiming 16 MiB
])
def test_tls_that_names_nothing(data):
    assert peek_names(data) == SniffResult(names=(), complete=True)


@pytest.mark.parametrize(("head", "names"), [
    (b"GET / HTTP/1.1\r\nHost: svc.test:8080\r\nAccept: */*\r\n\r\n", ("svc.test",)),
    (b"POST /x HTTP/1.0\r\nhost: SVC.Test.\r\nContent-Length: 0\r\n\r\n", ("svc.test",)),
    (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", ("2001:db8::1",)),
    (b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\nbody and a next request", ("svc.test",)),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", ("svc.test",)),
    (b"GET / HTTP/1.1\nHost: svc.test\n\n", ("svc.test",)),  # bare LF
    (b"GET / HTTP/1.0\r\n\r\n", ()),  # HTTP/1.0 without Host
    (b"GET / HTTP/1.1\r\n\r\n", ()),  # HTTP/1.1 without Host: a bad request
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ()),  # HTTP/2 prior knowledge
])
def test_http_host(head, names):
    assert peek_names(head) == SniffResult(names=names, complete=True)


def test_partial_http_asks_for_more():
    head = b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    for cut in range(1, len(head) - 1):
        assert not peek_names(head[:cut]).complete, head[:cut]
    assert peek_names(head).names == ("svc.test",)


@pytest.mark.parametrize("data", [
    b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01\x02", b"get / http/1.1\r\n\r\n",
    b"GET\x00\xff junk\r\n\r\n", b"A" * 2048,
])
def test_other_protocols_name_nothing(data):
    assert peek_names(data) == SniffResult(names=(), complete=True)


def test_nothing_yet():
    assert peek_names(b"") == SniffResult(complete=False)


def test_garbage_never_raises():
    rng = random.Random(6890)
    hello = client_hello("svc.test")
    head = b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    for _ in range(3000):
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 600))
        elif kind == 1:
            data = b"\x16\x03" + rng.randbytes(rng.randrange(0, 600))
        else:  # a real message with a few bytes changed
            data = bytearray(hello if kind == 2 else head)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[:rng.randrange(1, len(data) + 1)])
        result = peek_names(data)
        assert isinstance(result.names, tuple) and isinstance(result.complete, bool)
