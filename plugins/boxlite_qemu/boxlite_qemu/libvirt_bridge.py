"""The stream bridge of a box on a remote libvirt host: one process per box.

A remote daemon's VM has its agent channel and its serial console on *its* host. libvirt hands
both out over the connection we already have, with its authentication and encryption:
``virDomainOpenChannel`` and ``virDomainOpenConsole`` each give a byte stream. This process
serves them where the core expects a local VM's:

* the agent socket (``BOXDIR/agent.sock``, 0600): every connection gets a fresh channel
  stream (``VIR_DOMAIN_CHANNEL_FORCE`` takes the port from an earlier holder, as a new
  connection to a local QEMU's socket would), so the shim's reconnect after a broken
  connection is a reconnect here too, over a new libvirt connection if the old one died;
* the console socket (``BOXDIR/console.sock``) the capped log writer reads.

No extra port is opened on either host. The libvirt connection runs libvirt's default event
loop (in a thread), so keepalive notices a dead daemon within :data:`KEEPALIVE_INTERVAL` x
(:data:`KEEPALIVE_COUNT` + 1) seconds; streams then fail, the shim sees its connection end
(GuestError to the caller), and the next connection reopens everything once the daemon is
back. The bridge ends when the domain is gone (destroyed, shut off) or on SIGTERM.

Run as ``python -m boxlite_qemu.libvirt_bridge --uri URI --uuid UUID --port-name NAME
--agent-socket PATH --console-socket PATH``; prints ``ready`` once both sockets listen and
the console stream is open.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING

from .libvirt_conn import LibvirtTimeout, bounded

if TYPE_CHECKING:
    import libvirt

#: seconds between keepalive probes, and how many may go unanswered (libvirt's own defaults
#: for its tools are 5 and 5; a box's exec should fail sooner)
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
#: seconds between checks that the domain still exists
WATCH_INTERVAL = 2.0
#: bytes per read, either way
CHUNK = 256 * 1024
#: seconds to wait before trying a dead daemon again
RETRY_DELAY = 1.0
VIR_DOMAIN_CHANNEL_FORCE = 1
VIR_DOMAIN_CONSOLE_FORCE = 1


def _log(message: str) -> None:
    print(f"libvirt-bridge: {message}", file=sys.stderr, flush=True)


class Bridge:
    """The libvirt connection (reopened after it dies) and the domain, for the pumps."""

    def __init__(self, libvirt: ModuleType, uri: str, uuid: str) -> None:
        self.libvirt, self.uri, self.uuid = libvirt, uri, uuid
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        #: set when the last virConnectOpen returned; unset while one we gave up on still
        #: waits (a daemon that accepts and never answers): no second one is started then
        self._opened = threading.Event()
        self._opened.set()
        self.done = threading.Event()

    def connection(self) -> libvirt.virConnect:
        """A live connection (opened now if the last one died). Raises libvirtError or
        LibvirtTimeout when the daemon cannot be reached."""
        with self._lock:
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(Exception):
                    if bounded("virConnectIsAlive", self.uri, conn.isAlive, timeout=10):
                        return conn
                with contextlib.suppress(Exception):
                    bounded("virConnectClose", self.uri, conn.close, timeout=5)
                self._conn = None
            if not self._opened.is_set():
                # each try would leave one more thread and socket waiting on the daemon
                raise LibvirtTimeout(f"libvirt virConnectOpen on {self.uri}: the last "
                                     "attempt has not been answered yet")
            opened = self._opened = threading.Event()

            def open_now() -> libvirt.virConnect:
                try:
                    return self.libvirt.open(self.uri)
                finally:
                    opened.set()

            conn = bounded("virConnectOpen", self.uri, open_now,
                           on_abandoned=lambda late: late.close())
            with contextlib.suppress(self.libvirt.libvirtError):
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            self._conn = conn
            return conn

    def domain(self) -> libvirt.virDomain:
        conn = self.connection()
        return bounded("virDomainLookupByUUIDString", self.uri, conn.lookupByUUIDString,
                       self.uuid)

    def open_stream(self, kind: str, port_name: str) -> libvirt.virStream:
        """A new stream on the domain's agent channel (``kind`` "channel") or console."""
        dom = self.domain()
        stream = bounded("virStreamNew", self.uri, dom.connect().newStream, 0)
        if kind == "channel":
            bounded("virDomainOpenChannel", self.uri, dom.openChannel, port_name, stream,
                    VIR_DOMAIN_CHANNEL_FORCE)
        else:
            bounded("virDomainOpenConsole", self.uri, dom.openConsole, None, stream,
                    VIR_DOMAIN_CONSOLE_FORCE)
        return stream

    def domain_gone(self) -> bool:
        """True only when the daemon answers that the domain is not running: an unreachable
        daemon is not a dead domain."""
        try:
            dom = self.domain()
            return not bounded("virDomainIsActive", self.uri, dom.isActive)
        except self.libvirt.libvirtError as exc:
            return exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN
        except LibvirtTimeout:
            return False


def _close_stream(stream: libvirt.virStream) -> None:
    with contextlib.suppress(Exception):
        stream.abort()


def _copy_out(stream: libvirt.virStream, sock: socket.socket) -> None:
    """Copy the stream into the socket until either end closes or fails."""
    with contextlib.suppress(Exception):
        while True:
            data = stream.recv(CHUNK)
            if not isinstance(data, bytes) or not data:
                return
            sock.sendall(data)


def _stream_to_socket(stream: libvirt.virStream, sock: socket.socket) -> None:
    """:func:`_copy_out`; then shut the socket's write side."""
    _copy_out(stream, sock)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def _socket_to_stream(sock: socket.socket, stream: libvirt.virStream) -> None:
    with contextlib.suppress(Exception):
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                sent = stream.send(view.tobytes())
                if sent < 0:
                    time.sleep(0.005)  # -2: would block (a non-blocking stream)
                    continue
                view = view[sent:]


def _pump(stream: libvirt.virStream, sock: socket.socket) -> None:
    """Both directions until one ends; then close both."""
    back = threading.Thread(target=_stream_to_socket, args=(stream, sock), daemon=True)
    back.start()
    _socket_to_stream(sock, stream)
    # the socket side ended: the stream's reader ends when the stream is aborted
    _close_stream(stream)
    back.join(5)
    with contextlib.suppress(OSError):
        sock.close()


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600: only our user may talk to the agent
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def serve_agent(bridge: Bridge, listener: socket.socket, port_name: str) -> None:
    """Each connection on the agent socket: a fresh channel stream, pumped until it ends."""
    while not bridge.done.is_set():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            stream = bridge.open_stream("channel", port_name)
        except Exception as exc:
            _log(f"agent channel {port_name!r} could not be opened: {exc}")
            conn.close()
            time.sleep(RETRY_DELAY)
            continue
        threading.Thread(target=_pump, args=(stream, conn), daemon=True,
                         name="agent-pump").start()


def serve_console(bridge: Bridge, listener: socket.socket, first: libvirt.virStream) -> None:
    """The log writer's connection gets the console; reopened after a broken connection
    (what the guest printed meanwhile is lost: libvirt keeps no console history)."""
    stream: libvirt.virStream | None = first
    try:
        writer, _ = listener.accept()
    except OSError:
        return
    while not bridge.done.is_set():
        if stream is None:
            try:
                stream = bridge.open_stream("console", "")
                writer.sendall(b"\r\n[boxlite: console reconnected; output may be missing]\r\n")
            except Exception:
                time.sleep(RETRY_DELAY)
                continue
        _copy_out(stream, writer)
        _close_stream(stream)
        stream = None
        if bridge.domain_gone():
            break
        time.sleep(RETRY_DELAY)
    with contextlib.suppress(OSError):
        writer.close()


def watch(bridge: Bridge) -> None:
    """Set ``bridge.done`` once the daemon says the domain is gone."""
    while not bridge.done.wait(WATCH_INTERVAL):
        if bridge.domain_gone():
            bridge.done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boxlite_qemu.libvirt_bridge")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--port-name", required=True)
    parser.add_argument("--agent-socket", required=True)
    parser.add_argument("--console-socket", required=True)
    args = parser.parse_args(argv)
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # the default event loop: keepalive (a dead daemon is noticed) needs one
    libvirt.virEventRegisterDefaultImpl()

    def run_events() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run_events, daemon=True, name="libvirt-events").start()
    bridge = Bridge(libvirt, args.uri, args.uuid)
    signal.signal(signal.SIGTERM, lambda *_: bridge.done.set())
    try:
        console = bridge.open_stream("console", "")
    except Exception as exc:
        _log(f"cannot open the console of domain {args.uuid} at {args.uri}: {exc}")
        return 1
    agent_listener = _listen(args.agent_socket)
    console_listener = _listen(args.console_socket)
    threading.Thread(target=serve_console, args=(bridge, console_listener, console),
                     daemon=True, name="console").start()
    threading.Thread(target=serve_agent, args=(bridge, agent_listener, args.port_name),
                     daemon=True, name="agent").start()
    threading.Thread(target=watch, args=(bridge,), daemon=True, name="watch").start()
    print("ready", flush=True)
    bridge.done.wait()
    for listener, path in ((agent_listener, args.agent_socket),
                           (console_listener, args.console_socket)):
        with contextlib.suppress(OSError):
            listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
