"""Host end of the agent channel: one entry, :func:`connect`, for every channel kind.

A backend picks the kind (``VmmBackend.channel_kind``, recorded in ``VmSpec.agent``); this
module picks the code that reaches the agent through it and returns a
:class:`~.target.Transport` whose ``target`` grpc dials:

* ``virtio-serial`` (QEMU, libvirt): BOXDIR/agent.port is the backend's chardev socket server;
  the guest writes ``READY\\n`` on each attach (port.py). Only one host can hold that stream,
  so a per-box shim process owns it (shimctl.py starts/finds/stops it; shim.py is the
  process, relaying through a SerialBridge, bridge.py) and serves gRPC to every host process.
* ``virtio-serial-inproc``: the same bridge run in the calling process instead of a shim
  (the pre-shim behaviour; benchmarks and diagnosis only).
* ``vsock`` (libkrun, hvf, Firecracker-style): every connect on the backend's socket is its
  own stream to the agent, with no READY line; gRPC dials it directly, or through a relay that
  first does the Firecracker hybrid-vsock ``CONNECT``/``OK`` handshake (stream.py).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError
from ..proto.wire import AGENT_VSOCK_PORT
from ..vmm.spec import ChannelKind, Handshake
from .bridge import SerialBridge
from .port import PORT_NAME, open_port
from .shimctl import SHIM_SOCK_NAME, connect_shim
from .stream import DirectStream, HandshakeRelay
from .target import Transport

INPROC = "virtio-serial-inproc"
KINDS = (ChannelKind.VIRTIO_SERIAL.value, ChannelKind.VSOCK.value, INPROC)
#: what box records written before the channel was typed call a vsock channel
_LEGACY_VSOCK = ("stream", "vsock-stream")
#: sun_path holds 108 bytes including the NUL
_MAX_SOCKET_PATH = 107
_relay_ids = itertools.count()


def _relay_path(box_dir: Path) -> Path:
    """A handshake relay socket of this process: unique per connect, in the private box dir."""
    path = box_dir.absolute() / f"agent.hs.{os.getpid()}.{next(_relay_ids)}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise GuestError(
            f"the handshake relay socket {path} is longer than {_MAX_SOCKET_PATH} bytes, the "
            "unix socket limit; use a shorter BOXLITE_HOME (box directory)"
        )
    return path


def connect(
    box_dir: Path,
    *,
    kind: str = ChannelKind.VIRTIO_SERIAL,
    socket_path: Path | None = None,
    timeout: float = 60.0,
    is_alive: Callable[[], bool] = lambda: True,
    console_tail: Callable[[], str] = lambda: "",
    handshake: str = Handshake.NONE,
    vsock_port: int = AGENT_VSOCK_PORT,
    ready_retry: float | None = None,
    standby: bool = True,
) -> Transport:
    """A transport to the box's agent (``kind``, ``socket_path``, ``handshake`` and
    ``vsock_port`` as in the spec's :class:`~boxlite_core.vmm.spec.AgentChannel`).
    ``standby``: a shim this process started ahead may serve (shimctl.connect_shim).

    virtio-serial waits (up to ``timeout`` seconds, racing ``is_alive``) for the shim to have
    seen READY; vsock returns at once (the client's first Ping is the readiness check).

    Raises:
        GuestError: the VM died or the timeout passed before the agent was ready (with the
            console tail), the shim failed, a vsock kind has no ``socket_path``, or the kind
            or handshake is unknown.
    """
    box_dir = Path(box_dir)
    if kind == ChannelKind.VIRTIO_SERIAL:
        port_path = Path(socket_path) if socket_path else box_dir / PORT_NAME
        return connect_shim(
            box_dir, port_path, timeout=timeout, is_alive=is_alive, console_tail=console_tail,
            ready_retry=ready_retry, standby=standby,
        )
    if kind == INPROC:
        port_path = Path(socket_path) if socket_path else box_dir / PORT_NAME
        first = open_port(
            port_path,
            deadline=time.monotonic() + timeout,
            is_alive=is_alive,
            console_tail=console_tail,
        )
        return SerialBridge(
            port_path,
            box_dir / SHIM_SOCK_NAME,
            first,
            reconnect_timeout=min(timeout, 30.0),
            is_alive=is_alive,
            console_tail=console_tail,
        )
    if kind == ChannelKind.VSOCK or kind in _LEGACY_VSOCK:
        if socket_path is None:
            raise GuestError(f"channel kind {kind!r} needs socket_path (the backend's socket)")
        try:
            shake = Handshake(handshake)
        except ValueError:
            known = [h.value for h in Handshake]
            raise GuestError(
                f"unknown agent channel handshake {handshake!r}; known: {known}"
            ) from None
        if shake is Handshake.NONE:
            return DirectStream(Path(socket_path))
        return HandshakeRelay(
            Path(socket_path),
            _relay_path(box_dir),
            handshake=shake,
            vsock_port=vsock_port,
            timeout=min(timeout, 5.0),
        )
    raise GuestError(f"unknown agent channel kind {kind!r}; expected one of {KINDS}")
