"""Host end of the agent channel: wait for READY, then bridge gRPC onto the guest's byte stream.

Two channel kinds, chosen by the backend:

* ``virtio-serial`` (QEMU, libvirt): BOXDIR/agent.port is a QEMU chardev socket server; the
  guest writes ``READY\\n`` when it sees a host attach, then the stream carries one HTTP/2
  connection. Only one host can hold that stream, so a per-box *shim* process
  (channel/shim.py) owns it and serves real gRPC at BOXDIR/agent.grpc.sock (mode 0600) to any
  number of host processes. connect() dials a live shim or starts one (under BOXDIR/shim.lock
  so racing processes never start two). Closing a client leaves the shim running; stop_shim()
  (the runtime's stop/kill/cleanup) and the VM's death end it.
  Inside the shim a *bridge* (SerialBridge, BOXDIR/agent.bridge.sock) relays the shim's one
  gRPC connection onto a fresh port connection (the guest resets its side on every re-attach,
  so two HTTP/2 sessions never share one stream). ``virtio-serial-inproc`` runs that bridge in
  the calling process instead (the pre-shim behaviour; benchmarks and diagnosis only).
* ``stream`` (libkrun vsock, ...): every connect to the backend's socket is its own stream to
  the agent and there is no READY line; gRPC dials that socket directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError
from ..vmm.procstat import alive, log_tail, terminate

READY = b"READY\n"
PORT_NAME = "agent.port"
SHIM_SOCK_NAME = "agent.grpc.sock"  # what host clients dial (served by the shim)
BRIDGE_NAME = SHIM_SOCK_NAME  # historical name of the same path
PRIVATE_BRIDGE_NAME = "agent.bridge.sock"  # the shim's own port relay
#: Largest gRPC message the host accepts from the guest (bytes). The agent never sends more
#: than 1 MiB in one message (coalesced output, 256 KiB download chunks); a guest that sends
#: more has been replaced by hostile code, and without a bound one message could make the host
#: (shim or client) allocate gigabytes. Requests the host sends are not bounded here.
MAX_GUEST_MESSAGE = 16 * 1024 * 1024
SHIM_JSON = "shim.json"
SHIM_LOCK = "shim.lock"
SHIM_LOG = "shim.log"
KINDS = ("virtio-serial", "stream", "virtio-serial-inproc")
_umask_lock = threading.Lock()


class PortGone(GuestError):
    """The port socket refuses connections or is missing: nobody (no VM) listens any more."""


def _dead_error(what: str, console_tail: Callable[[], str]) -> GuestError:
    tail = ""
    try:
        tail = console_tail() or ""
    except Exception as exc:  # the tail is a diagnosis aid; never mask the real error
        tail = f"(console tail unavailable: {exc})"
    tail = tail.strip()
    suffix = f"\n--- guest console (last lines) ---\n{tail}" if tail else " (console log empty)"
    return GuestError(f"the box's VM stopped {what}{suffix}")


def _ready_timeout_error(path: Path, console_tail: Callable[[], str]) -> GuestError:
    tail = ""
    with contextlib.suppress(Exception):
        tail = console_tail().strip()
    return GuestError(
        f"timed out waiting for the guest agent's READY on {path}; the guest may be slow to "
        "boot (raise the timeout) or its agent failed"
        + (f"\n--- guest console (last lines) ---\n{tail}" if tail else "")
    )


def open_port(
    path: Path,
    *,
    deadline: float,
    is_alive: Callable[[], bool],
    console_tail: Callable[[], str],
    gone_if_refused: bool = False,
    ready_timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[socket.socket, bytes]:
    """Connect to the port socket and read the READY line; return the socket and any bytes
    that followed READY in the same read (the start of the server's HTTP/2 preface).

    gone_if_refused: a refused/missing socket raises PortGone at once. Used once the port has
    been seen: a chardev server with a client attached still queues connects, so only a VM
    that is gone refuses them.
    ready_timeout: give one connection this long to bring READY, then hang up and connect
    again. For re-attaches to a running guest: QEMU 7.2 can leave the port throttled after a
    host hung up while the guest was writing, and then the guest's next READY sits in the
    virtqueue for good; only a new detach (QEMU un-throttles and discards on close, the guest
    sees the hang-up and offers READY again) gets it going (notes/agent-stall.md)."""
    while True:
        if not is_alive():
            raise _dead_error("before its guest agent became ready", console_tail)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if gone_if_refused:
                raise PortGone(f"the agent port {path} is gone ({exc.strerror})") from None
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out waiting for the agent socket {path} ({exc.strerror}); "
                    "check that the VM backend created it"
                ) from None
            time.sleep(0.05)
            continue
        buf = b""
        sock.settimeout(0.1)
        give_up = None if ready_timeout is None else time.monotonic() + ready_timeout
        pause = 0.05
        while READY not in buf:
            if not is_alive():
                sock.close()
                raise _dead_error("before its guest agent became ready", console_tail)
            if time.monotonic() >= deadline:
                sock.close()
                raise _ready_timeout_error(path, console_tail)
            if give_up is not None and time.monotonic() >= give_up:
                if log is not None:
                    log(f"no READY within {ready_timeout:.0f}s of attaching to {path}; "
                        "dropping this port connection and attaching again")
                pause = 0.2  # long enough for the guest to see this detach
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:  # queued, then the listener went away: re-check
                chunk = b""
            if not chunk:  # the chardev dropped us (VM exiting?): reconnect and re-check
                break
            buf += chunk
        else:
            sock.settimeout(None)
            return sock, buf.split(READY, 1)[1]
        sock.close()
        time.sleep(pause)


def _relay(a: socket.socket, b: socket.socket, first_to_a: bytes) -> None:
    """Copy both ways until either side closes, then tear both down."""
    done = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            done.set()
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    if first_to_a:
        try:
            a.sendall(first_to_a)
        except OSError:  # gRPC gave up on this connection already; the caller resets the port
            return
    t = threading.Thread(target=pump, args=(b, a), daemon=True, name="bridge-port>grpc")
    t.start()
    pump(a, b)
    t.join()


class Transport:
    """What connect() returns: the target for grpc.insecure_channel, and close()."""

    target: str

    def close(self) -> None:  # pragma: no cover - overridden
        pass


class DirectStream(Transport):
    def __init__(self, path: Path) -> None:
        self.target = f"unix:{path}"


class ShimTransport(Transport):
    """A connection to the box's shim: closing it leaves the shim (and the port) alone."""

    def __init__(self, box_dir: Path, pid: int) -> None:
        self.pid = pid
        self.target = f"unix:{Path(box_dir).absolute() / SHIM_SOCK_NAME}"


class SerialBridge(Transport):
    """Listening unix socket relaying one gRPC connection at a time to the port.

    eager: after a relay ends, open the next port connection at once (the shim holds the port
    this way, and a refused reopen tells it the VM is gone: on_port_lost(reason) is called and
    the bridge stops).
    ready_retry: seconds a re-attach may wait for READY before it is dropped and made again
    (see open_port's ready_timeout)."""

    def __init__(
        self,
        port_path: Path,
        bridge_path: Path,
        first: tuple[socket.socket, bytes],
        *,
        reconnect_timeout: float,
        is_alive: Callable[[], bool],
        console_tail: Callable[[], str],
        eager: bool = False,
        on_port_lost: Callable[[str], None] | None = None,
        reopen_delay: float = 0.0,
        ready_retry: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.port_path = port_path
        self._reopen_delay = reopen_delay
        self._ready_retry = ready_retry
        self._log = log or (lambda _msg: None)
        self._eager = eager
        self._on_port_lost = on_port_lost
        self.bridge_path = bridge_path
        self._pending: tuple[socket.socket, bytes] | None = first
        self._reconnect_timeout = reconnect_timeout
        self._is_alive = is_alive
        self._console_tail = console_tail
        self._closed = threading.Event()
        self._active: list[socket.socket] = []
        with contextlib.suppress(FileNotFoundError):
            bridge_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _umask_lock:  # umask is process-wide: never let the socket exist group/world-open
            old = os.umask(0o177)
            try:
                self.listener.bind(str(bridge_path))
            finally:
                os.umask(old)
        os.chmod(bridge_path, 0o600)
        self.listener.listen(4)
        self.target = f"unix:{bridge_path}"
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="agent-bridge")
        self._thread.start()

    def _reopen(self) -> tuple[socket.socket, bytes] | None:
        """A fresh port connection (READY read), or None; a gone port ends the bridge."""
        try:
            return open_port(
                self.port_path,
                deadline=time.monotonic() + self._reconnect_timeout,
                is_alive=lambda: self._is_alive() and not self._closed.is_set(),
                console_tail=self._console_tail,
                gone_if_refused=self._eager,
                ready_timeout=self._ready_retry,
                log=self._log,
            )
        except PortGone as exc:
            self.last_error = str(exc)
            if self._on_port_lost is not None and not self._closed.is_set():
                self._on_port_lost(str(exc))
            self._closed.set()
        except (GuestError, OSError) as exc:
            self.last_error = str(exc)
        return None

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            pending, self._pending = self._pending, None
            if pending is None:
                pending = self._reopen()
                if pending is None:
                    client.close()  # gRPC sees UNAVAILABLE; the client maps it to GuestError
                    continue
            port_sock, leftover = pending
            self._active = [client, port_sock]
            try:
                _relay(client, port_sock, leftover)
            except OSError as exc:  # one broken connection must not end the bridge
                self.last_error = f"bridge connection failed: {exc}"
            finally:
                self._active = []
                client.close()
                port_sock.close()
            if self._eager and not self._closed.is_set():
                self._log(f"port connection ended ({self.last_error or 'closed'}); re-opening")
                # Let the guest see the detach (virtio-serial host_connected drops) before we
                # attach again; an instant re-attach could go unnoticed and never bring READY.
                self._closed.wait(self._reopen_delay)
                self._pending = self._reopen()
                self._log("READY again" if self._pending else f"re-open: {self.last_error}")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in list(self._active):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._pending is not None:
            self._pending[0].close()
            self._pending = None
        with contextlib.suppress(FileNotFoundError):
            self.bridge_path.unlink()
        self._thread.join(timeout=2)


# -- the per-box shim (host side) ------------------------------------------------------------


def _read_shim_info(box_dir: Path) -> dict | None:
    try:
        info = json.loads((box_dir / SHIM_JSON).read_text())
        pid, started = int(info["pid"]), int(info["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if alive(pid, started) else None


def live_shim(box_dir: Path) -> dict | None:
    """shim.json of a shim that is running and accepting on its socket, else None."""
    box_dir = Path(box_dir)
    info = _read_shim_info(box_dir)
    if info is None:
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(info.get("socket") or box_dir / SHIM_SOCK_NAME))
    except OSError:
        return None
    finally:
        probe.close()
    return info


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _spawn_shim(box_dir: Path, port_path: Path, timeout: float) -> subprocess.Popen:
    env = dict(os.environ)
    root = _package_root()  # the shim must import the same boxlite_core as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [
        sys.executable,
        "-m",
        "boxlite_core.channel.shim",
        "--box-dir",
        str(box_dir.absolute()),
        "--port",
        str(port_path.absolute()),
        "--timeout",
        str(timeout),
    ]
    with open(box_dir / SHIM_LOG, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this process; a ^C here must not reach it
            close_fds=True,
        )
    # Reap it whenever it exits, so it never lingers as a zombie of a long-lived host process.
    threading.Thread(target=proc.wait, daemon=True, name=f"shim-reaper-{proc.pid}").start()
    return proc


def _kill_spawned(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def connect_shim(
    box_dir: Path,
    port_path: Path,
    *,
    timeout: float,
    is_alive: Callable[[], bool],
    console_tail: Callable[[], str],
) -> ShimTransport:
    """Dial the box's live shim, or start one and wait until it serves (it has seen READY),
    racing the timeout, the VM's death and the shim's own death."""
    box_dir = Path(box_dir)
    deadline = time.monotonic() + timeout
    info = live_shim(box_dir)
    if info is not None:
        return ShimTransport(box_dir, int(info["pid"]))
    lock_fd = os.open(box_dir / SHIM_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:  # one process at a time may start a shim; the others then dial it
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if not is_alive():
                raise _dead_error("before its guest agent became ready", console_tail)
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out waiting for {box_dir / SHIM_LOCK}: another process is starting "
                    "the box's agent shim and has not finished"
                )
            time.sleep(0.02)
        info = live_shim(box_dir)
        if info is not None:
            return ShimTransport(box_dir, int(info["pid"]))
        proc = _spawn_shim(box_dir, port_path, max(1.0, deadline - time.monotonic()))
        try:
            while True:
                info = _read_shim_info(box_dir)
                if info is not None and int(info["pid"]) == proc.pid:
                    return ShimTransport(box_dir, proc.pid)
                if not is_alive():
                    raise _dead_error("before its guest agent became ready", console_tail)
                if proc.poll() is not None:
                    raise GuestError(
                        f"the agent shim of {box_dir} exited with status {proc.returncode} "
                        f"before serving; its log ({box_dir / SHIM_LOG}) ends:\n"
                        f"{log_tail(box_dir / SHIM_LOG, 1000, 2000) or '(empty)'}"
                    )
                if time.monotonic() >= deadline:
                    raise _ready_timeout_error(port_path, console_tail)
                time.sleep(0.01)
        except BaseException:
            _kill_spawned(proc)
            raise
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)


def stop_shim(box_dir: Path, timeout: float = 5.0) -> bool:
    """End the box's shim (SIGTERM, then SIGKILL) and remove its files. True if one ran."""
    box_dir = Path(box_dir)
    info = _read_shim_info(box_dir)
    stopped = False
    if info is not None:
        stopped = terminate(int(info["pid"]), int(info["start_time"]), timeout)
    # Its files, whether it cleaned up or was killed (only when no live shim owns them).
    if _read_shim_info(box_dir) is None:
        for name in (SHIM_JSON, SHIM_SOCK_NAME, PRIVATE_BRIDGE_NAME):
            with contextlib.suppress(OSError):  # best effort: never fail a stop over a file
                (box_dir / name).unlink()
    return stopped


def connect(
    box_dir: Path,
    *,
    kind: str = "virtio-serial",
    socket_path: Path | None = None,
    timeout: float = 60.0,
    is_alive: Callable[[], bool] = lambda: True,
    console_tail: Callable[[], str] = lambda: "",
) -> Transport:
    """Wait for the agent (READY, racing VM death and the timeout) and return a transport."""
    box_dir = Path(box_dir)
    if kind == "virtio-serial":
        port_path = Path(socket_path) if socket_path else box_dir / PORT_NAME
        return connect_shim(
            box_dir, port_path, timeout=timeout, is_alive=is_alive, console_tail=console_tail
        )
    if kind == "virtio-serial-inproc":
        port_path = Path(socket_path) if socket_path else box_dir / PORT_NAME
        first = open_port(
            port_path,
            deadline=time.monotonic() + timeout,
            is_alive=is_alive,
            console_tail=console_tail,
        )
        return SerialBridge(
            port_path,
            box_dir / BRIDGE_NAME,
            first,
            reconnect_timeout=min(timeout, 30.0),
            is_alive=is_alive,
            console_tail=console_tail,
        )
    if kind in ("stream", "vsock-stream"):
        if socket_path is None:
            raise GuestError(f"channel kind {kind!r} needs socket_path (the backend's socket)")
        return DirectStream(Path(socket_path))
    raise GuestError(f"unknown agent channel kind {kind!r}; expected one of {KINDS}")
