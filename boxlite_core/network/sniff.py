"""Names a connection announces in its first bytes: a TLS ClientHello's SNI, an HTTP Host.

The relay reads these before it decides on a connection that no address rule allows, so a
box that connects by number (having resolved the name elsewhere, or cached it) still reaches
a host its name rules allow — but only if the host's own resolver maps that name to the
destination (policy.Decider), so a made-up SNI opens nothing. Parsing is done by libraries:
tlslite-ng for the ClientHello, h11 for the HTTP/1.x request head.

The caller reads the connection's first bytes up to a bound of its own (the relay: 16 KiB or
2 s) and asks after each read; ``complete=False`` means more bytes might name something.
"""

from __future__ import annotations

import warnings

import attrs
import h11

with warnings.catch_warnings():  # tlslite-ng's package imports asyncore (deprecated in 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    from tlslite.messages import ClientHello
    from tlslite.utils.codec import Parser

#: TLS record content type "handshake" (RFC 8446 5.1) and handshake type client_hello (4)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
#: a TLS record holds at most 2^14 bytes of plaintext (RFC 8446 5.1)
_MAX_RECORD = 1 << 14
#: a ClientHello longer than this is not one we wait for (real ones are under 2 KiB)
_MAX_HELLO = 1 << 16
#: longest HTTP method we recognise as the start of a request line
_MAX_METHOD = 16


@attrs.frozen
class SniffResult:
    """``names``: names found (lowercase, no port, no trailing dot). ``complete``: False if
    more bytes might still tell (the caller reads more, up to its bound, then decides with
    what it has); True once the bytes name something, or are not TLS or HTTP at all."""

    names: tuple[str, ...] = ()
    complete: bool = True


_MORE = SniffResult(complete=False)
_NOTHING = SniffResult()


def _clean(name: str) -> tuple[str, ...]:
    name = name.strip().rstrip(".").lower()
    return (name,) if name else ()


def _tls(data: bytes) -> SniffResult:
    """The SNI of a ClientHello, reassembled from as many handshake records as it spans."""
    body = bytearray()
    offset = 0
    while True:
        header = data[offset:offset + 5]
        if len(header) >= 2 and (header[0] != _HANDSHAKE or header[1] != 3):
            return _NOTHING  # not TLS, or another record before the hello was whole
        if len(header) < 5:
            return _MORE
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD:
            return _NOTHING
        fragment = data[offset + 5:offset + 5 + length]
        body += fragment
        offset += 5 + length
        if not body:
            return _MORE
        if body[0] != _CLIENT_HELLO:
            return _NOTHING
        if len(body) >= 4:
            hello_len = int.from_bytes(body[1:4], "big")
            if hello_len > _MAX_HELLO:
                return _NOTHING
            if len(body) >= 4 + hello_len:
                break
        if len(fragment) < length:
            return _MORE
    try:  # ClientHello.parse reads the 3-byte length, then the body
        hello = ClientHello().parse(Parser(bytearray(body[1:4 + hello_len])))
        name = hello.server_name
    except Exception:  # tlslite raises several types on a malformed hello
        return _NOTHING
    if not name:
        return _NOTHING
    return SniffResult(names=_clean(bytes(name).decode("ascii", "replace")))


def _host_header(value: bytes) -> tuple[str, ...]:
    host = value.decode("ascii", "replace").strip()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        host = host[1:end] if end > 0 else ""
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return _clean(host)


def _http(data: bytes) -> SniffResult:
    """The Host header of an HTTP/1.x request head, once the head is complete."""
    connection = h11.Connection(h11.SERVER)
    try:
        connection.receive_data(data)
        event = connection.next_event()
    except Exception:  # h11.RemoteProtocolError, mostly; garbage must never escape
        return _NOTHING
    if event is h11.NEED_DATA:
        return _MORE
    if not isinstance(event, h11.Request):
        return _NOTHING
    for key, value in event.headers:
        if key == b"host":
            return SniffResult(names=_host_header(value))
    return _NOTHING


def peek_names(data: bytes) -> SniffResult:
    """Names in a connection's first bytes (``data``: everything read so far).

    TLS: the ClientHello's server_name (a record of type 22 with handshake type 1). HTTP:
    the request's Host header, without its port. Anything else: complete, no names. Never
    raises, whatever ``data`` holds.
    """
    data = bytes(data)
    if not data:
        return _MORE
    if data[0] == _HANDSHAKE:
        return _tls(data)
    method = data.split(b" ", 1)[0]
    if method.isalpha() and method.isupper() and len(method) <= _MAX_METHOD:
        return _http(data) if b" " in data else _MORE
    return _NOTHING
