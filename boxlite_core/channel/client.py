"""Host-side client of the guest agent: the only way the runtime talks to a box's guest.

Every failure surfaces as GuestError. A dead VM must never hang a caller: unary calls carry
deadlines, Wait is polled in short server-side slices with an is_alive() check between them,
and a dropped connection is reported as "the box's VM stopped during <what>" when the VM is
indeed gone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from .. import envvars
from ..errors import AgentUnreachable, GuestError, GuestPathError
from ..models import ExitStatus, JsonObject
from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as rpc
from ..proto.wire import AGENT_VSOCK_PORT
from ..vmm.spec import Handshake
from . import transport as _transport
from .identity import Reseeded
from .port import dead_error
from .shimctl import ShimTransport, stop_shim
from .target import MAX_GUEST_MESSAGE, Transport

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # bytes per stdin / upload message
WAIT_SLICE = 5.0  # seconds per server-side Wait before re-checking is_alive()
EXEC_START_TIMEOUT = 60.0  # seconds the agent gets to start a command (Exec, Run)
_CONNECTION_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
_CHANNEL_OPTIONS = [
    # what the guest sends is hostile input: bounded (see MAX_GUEST_MESSAGE)
    ("grpc.max_receive_message_length", MAX_GUEST_MESSAGE),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 50),
    # Despite its name this is gRPC's *minimum connect timeout* (floored at 100 ms): the
    # time a connection attempt gets to finish the HTTP/2 handshake. At 50 a loaded TCG
    # guest could not answer in time and every attempt was dropped (notes/agent-stall.md).
    # 5 s, not gRPC's 20 s default: on a vsock channel (libkrun/hvf vsock sockets) an
    # attempt that hangs before the guest listens is then retried soon; the serial path
    # dials the local shim, which answers in milliseconds.
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # One connection per channel: the serial bridge carries exactly one HTTP/2 session.
    ("grpc.use_local_subchannel_pool", 1),
]

#: seconds a serial-channel agent may say READY yet not answer before the host resets the
#: channel (the first Ping normally answers within a second, even under TCG)
STALL_RESET_SECONDS = 25.0
#: bound on one file transfer (upload/download tar) and on a stdin write the agent does not
#: take; generous because a transfer may be GiBs under TCG. Seconds.
ENV_TRANSFER_TIMEOUT = "BOXLITE_AGENT_TRANSFER_TIMEOUT"
DEFAULT_TRANSFER_TIMEOUT = 3600.0


def transfer_timeout() -> float:
    """``BOXLITE_AGENT_TRANSFER_TIMEOUT`` (seconds, > 0) or 3600."""
    return envvars.seconds(ENV_TRANSFER_TIMEOUT, DEFAULT_TRANSFER_TIMEOUT)


class ExecSession:
    """A started process. Output is pulled in the background from the start, so wait() never
    deadlocks on a full pipe even if events() is never iterated."""

    def __init__(self, client: AgentClient, exec_id: str, stdin: bool) -> None:
        self.exec_id = exec_id
        self._client = client
        self._events: queue.Queue[Any] = queue.Queue()
        self._stdin_q: queue.Queue[pb.StdinChunk | None] | None = None
        self._stdin_future: Any = None
        self._stdin_wanted = stdin
        self._output_error: GuestError | None = None
        self._reader = threading.Thread(
            target=self._pull_output, daemon=True, name=f"exec-out-{exec_id}"
        )
        self._reader.start()

    # -- output -------------------------------------------------------------------
    _END = object()

    def _pull_output(self) -> None:
        names = {pb.OutputChunk.STDOUT: "stdout", pb.OutputChunk.STDERR: "stderr"}
        try:
            for chunk in self._client._execution.Output(pb.OutputRequest(exec_id=self.exec_id)):
                self._events.put((names.get(chunk.stream, "stdout"), chunk.data))
        except grpc.RpcError as exc:
            self._events.put(self._client._error(exc, "exec"))
        finally:
            self._events.put(self._END)

    def events(self) -> Iterator[tuple[str, bytes]]:
        """("stdout" | "stderr", data) in arrival order; ends when the process's pipes close."""
        while True:
            item = self._events.get()
            if item is self._END:
                self._events.put(self._END)  # a later call also ends at once
                return
            if isinstance(item, GuestError):
                self._events.put(self._END)
                raise item
            yield item

    # -- stdin ----------------------------------------------------------------------
    def _stdin_stream(self, q: queue.Queue) -> Iterator[pb.StdinChunk]:
        while (msg := q.get()) is not None:
            yield msg

    def write_stdin(self, data: bytes) -> None:
        if not self._stdin_wanted:
            raise GuestError(f"exec {self.exec_id}: started without stdin=True")
        if self._stdin_q is None:
            self._stdin_q = queue.Queue(maxsize=8)  # back-pressure: at most ~8 MiB in flight
            self._stdin_future = self._client._execution.Stdin.future(
                self._stdin_stream(self._stdin_q)
            )
        view = memoryview(data)
        bound = transfer_timeout()
        for i in range(0, len(view), CHUNK):
            chunk = pb.StdinChunk(exec_id=self.exec_id, data=bytes(view[i : i + CHUNK]))
            try:
                self._stdin_q.put(chunk, timeout=bound)
            except queue.Full:
                raise GuestError(
                    f"exec {self.exec_id}: the guest agent took no stdin for {bound:g} s; "
                    f"on a slow host raise {ENV_TRANSFER_TIMEOUT} (seconds)") from None

    def close_stdin(self) -> None:
        if not self._stdin_wanted:
            return
        if self._stdin_q is None:
            self.write_stdin(b"")
        assert self._stdin_q is not None
        self._stdin_q.put(pb.StdinChunk(exec_id=self.exec_id, close=True))
        self._stdin_q.put(None)
        try:
            self._stdin_future.result(timeout=60)
        except grpc.RpcError as exc:
            raise self._client._error(exc, "exec (stdin)") from None
        except grpc.FutureTimeoutError:
            raise GuestError(f"exec {self.exec_id}: closing stdin timed out") from None

    # -- status -------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Block until the process exits; TimeoutError if it is still running after timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ = WAIT_SLICE
            if deadline is not None:
                slice_ = max(0.0, min(slice_, deadline - time.monotonic()))
            reply = self._client._unary(
                self._client._execution.Wait,
                pb.WaitRequest(exec_id=self.exec_id, timeout=slice_ or 0.001),
                "exec",
                timeout=slice_ + 30,
            )
            if not reply.running:
                return ExitStatus(
                    exit_code=reply.exit_code if reply.has_exit_code else None,
                    signal=reply.signal or None,
                    timed_out=reply.timed_out,
                )
            if not self._client._alive():
                raise self._client._dead("exec", "the process was still running")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"exec {self.exec_id} still running after {timeout}s")

    def kill(self, signal: int = 15) -> None:
        self._client._unary(
            self._client._execution.Kill,
            pb.KillRequest(exec_id=self.exec_id, signal=signal),
            "exec (kill)",
            timeout=15,
        )

    def resize(self, rows: int, cols: int) -> None:
        """Set a tty exec's window size (character cells). GuestError when it has no
        terminal or the agent predates terminals."""
        self._client._unary(
            self._client._execution.Resize,
            pb.ResizeRequest(exec_id=self.exec_id,
                             size=pb.TerminalSize(rows=rows, cols=cols)),
            "exec (resize)",
            timeout=15,
        )


def _exec_request(
    args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
    user: str | None = None, timeout: float | None = None, stdin: bool = False,
    tty: bool = False, size: tuple[int, int] | None = None,
) -> pb.ExecRequest:
    request = pb.ExecRequest(args=list(args), env=dict(env or {}), cwd=cwd or "",
                             user=user or "", timeout=float(timeout or 0), stdin=stdin,
                             tty=tty)
    if tty and size is not None:
        request.size.rows, request.size.cols = size
    return request


class AgentClient:
    """gRPC client of one box's guest agent (see agent.proto for the semantics)."""

    def __init__(
        self,
        transport: Transport,
        *,
        is_alive: Callable[[], bool],
        console_tail: Callable[[], str],
    ) -> None:
        self._transport = transport
        self._is_alive = is_alive
        self._console_tail = console_tail
        self._channel = grpc.insecure_channel(transport.target, options=_CHANNEL_OPTIONS)
        self._guest = rpc.GuestStub(self._channel)
        self._execution = rpc.ExecutionStub(self._channel)
        self._files = rpc.FilesStub(self._channel)
        self._network = rpc.NetworkStub(self._channel)
        #: whether the agent has the Run call (one cleared by an UNIMPLEMENTED answer)
        self._has_run = True

    @classmethod
    def connect(
        cls,
        box_dir: Path,
        *,
        kind: str = "virtio-serial",
        socket_path: Path | None = None,
        timeout: float = 60.0,
        is_alive: Callable[[], bool] = lambda: True,
        console_tail: Callable[[], str] = lambda: "",
        handshake: str = Handshake.NONE,
        vsock_port: int = AGENT_VSOCK_PORT,
        ready_retry: float | None = None,
        ping: bool = True,
        standby: bool = True,
    ) -> AgentClient:
        """Wait for the agent (racing VM death and timeout), then check it answers a Ping.

        ``kind``, ``socket_path``, ``handshake`` and ``vsock_port`` are the spec's
        :class:`~boxlite_core.vmm.spec.AgentChannel` (see transport.connect);
        ``ready_retry`` (seconds, virtio-serial) re-attaches a port that brought no READY in
        that time: for a restored VM, whose agent may hold its saved host's session.
        ``ping=False`` (virtio-serial only: the shim has seen READY) returns without the
        Ping: the caller's first call (``init(first=True)``) is the check. ``standby``: see
        shimctl.connect_shim.
        """
        deadline = time.monotonic() + timeout
        resets = 0
        while True:
            t = _transport.connect(
                Path(box_dir),
                kind=kind,
                socket_path=socket_path,
                timeout=max(1.0, deadline - time.monotonic()),
                is_alive=is_alive,
                console_tail=console_tail,
                handshake=handshake,
                vsock_port=vsock_port,
                ready_retry=ready_retry,
                standby=standby,
            )
            client = cls(t, is_alive=is_alive, console_tail=console_tail)
            if not ping and isinstance(t, ShimTransport):
                return client
            try:
                if client._first_ping(box_dir, timeout, deadline, console_tail):
                    return client
            except BaseException:
                client.close()
                raise
            # The agent said READY but its gRPC session never answered. A backstop now: the
            # cause (gRPC dropping slow handshakes, each drop racing the guest's writes and
            # sometimes wedging QEMU's port) is fixed and the shim retries a wedged re-attach
            # itself (notes/agent-stall.md). Resetting the serial connection makes the guest
            # drop its side and offer READY again, which has recovered every time.
            client.close()
            resets += 1
            log.warning(
                "guest agent of %s said READY but did not answer for %.0fs; reconnecting (%d)",
                box_dir, STALL_RESET_SECONDS, resets,
            )
            stop_shim(Path(box_dir))

    def _first_ping(
        self,
        box_dir: Path,
        timeout: float,
        deadline: float,
        console_tail: Callable[[], str],
    ) -> bool:
        """Ping until answered (True) or stalled on a serial channel (False); raise on death or
        when the overall deadline passes. For vsock channels the first Ping is the
        readiness check, so it is retried until the deadline."""
        stall_at = time.monotonic() + STALL_RESET_SECONDS
        while True:
            try:
                self._guest.Ping(
                    pb.PingRequest(),
                    timeout=max(1.0, min(5.0, deadline - time.monotonic())),
                    wait_for_ready=True,
                )
                return True
            except grpc.RpcError as exc:
                if not self._alive():
                    raise dead_error(
                        "before its guest agent answered", console_tail
                    ) from None
                now = time.monotonic()
                if now >= deadline:
                    behind = self._transport.last_error
                    raise GuestError(
                        f"the guest agent of {box_dir} did not answer a Ping within "
                        f"{timeout}s: {exc.details() if hasattr(exc, 'details') else exc}"
                        + (f" (last channel error: {behind})" if behind else "")
                    ) from None
                if (
                    isinstance(self._transport, ShimTransport)
                    and now >= stall_at
                    and deadline - now > STALL_RESET_SECONDS / 2
                ):
                    return False
                time.sleep(0.1)

    # -- error handling ---------------------------------------------------------------
    def _alive(self) -> bool:
        try:
            return bool(self._is_alive())
        except Exception:
            return False

    def _dead(self, what: str, details: str) -> GuestError:
        err = dead_error(f"during {what}: {details}", self._console_tail)
        return err

    def _error(self, exc: grpc.RpcError, what: str) -> GuestError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(code)
        if code in _CONNECTION_CODES:
            # The VM may take a moment to be reaped after its socket closed.
            for _ in range(10):
                if not self._alive():
                    return self._dead(what, details)
                time.sleep(0.1)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                return GuestError(
                    f"lost the connection to the box's guest agent during {what} "
                    f"(the VM is still running): {details}"
                )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return GuestError(f"the guest agent did not answer {what} in time: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            limit = MAX_GUEST_MESSAGE // (1024 * 1024)
            return GuestError(
                f"the guest agent sent a message larger than {limit} MiB during {what}; the "
                f"real agent never does, so code in the box is misbehaving ({details})"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return GuestError(
                f"{what}: the box's guest agent is older than this boxlite and cannot do it "
                f"({details}); a box started now (or from a newer snapshot) can")
        return GuestError(f"{what} failed in the guest: {details}")

    def _unary(self, method, request, what: str, *, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            raise GuestError(f"{what}: this agent client is closed ({exc})") from None

    # -- API -------------------------------------------------------------------------------
    def ping(self) -> dict:
        reply = self._unary(self._guest.Ping, pb.PingRequest(), "ping", timeout=10)
        return {
            "version": reply.version,
            "uptime": reply.uptime,
            "agent_uptime": reply.agent_uptime,
            "initialized": reply.initialized,
        }

    def init(self, config: dict, *, first: bool = False, timeout: float = 180.0) -> None:
        """Mount the container rootfs and volumes. `config` mirrors InitRequest:

        {"disk": {"serial": "rootfs", "fstype": "ext4", "read_only": False}}   # one of
        {"share": {"tag": "rootfs", "fstype": "9p" | "virtiofs" | "bind", "options": ""}}
        {"layers": {"layers": [{"tag": "l0", "fstype": "virtiofs"}, ...],     # bottom first
                    "upper_serial": "upper", "upper_fstype": "ext4"}}
        + "volumes": [{"tag", "fstype", "guest_path", "read_only", "options"}], "hostname": str
        + "identity": channel.identity.host_identity(name)   # applied first, before any mount

        With ``first`` (the first call on a connection made with ``ping=False``: a VM
        restored from a boot template) it waits for the channel, bounded by ``timeout``
        seconds, and any failure other than the guest's own "Init failed" is raised as
        :class:`AgentUnreachable`: the caller may then drop the VM and boot another.
        """
        try:
            request = json_format.ParseDict(config, pb.InitRequest())
        except json_format.ParseError as exc:
            raise GuestError(f"bad guest init config: {exc}") from None
        if not first:
            self._unary(self._guest.Init, request, "init", timeout=timeout)
            return
        try:
            self._guest.Init(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            error = self._error(exc, "init")
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise error from None  # the guest ran Init and says why it failed
            raise AgentUnreachable(str(error)) from None
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            raise GuestError(f"init: this agent client is closed ({exc})") from None

    def reseed(self, identity: JsonObject, *, copy: bool = False) -> Reseeded:
        """Give a running guest a new identity (a box restored from a snapshot gets no Init).

        ``identity``: channel.identity.host_identity(name), made right before this call.
        ``copy``: the guest is a snapshot's copy; the exec sessions it inherited have no
        reader here, so the agent discards their output (their processes run on).
        Returns {"boot_id": str, "clock_step": float}: the guest's boot_id (clones of one
        snapshot share it) and the seconds its wall clock moved (positive: it was behind).

        Raises:
            GuestError: a malformed identity, or the guest could not apply it (it says why),
                or the agent did not answer within 30 s.
        """
        try:
            message = json_format.ParseDict(identity, pb.Identity())
        except json_format.ParseError as exc:
            raise GuestError(f"bad guest identity: {exc}") from None
        reply = self._unary(
            self._guest.Reseed, pb.ReseedRequest(identity=message, copy=copy), "reseed",
            timeout=30,
        )
        return {"boot_id": reply.boot_id, "clock_step": reply.clock_step}

    def configure_network(self, *, address: str, resolver: str,
                          hosts: Iterable[tuple[str, Sequence[str]]] = (),
                          egress: bool = True, udp_networks: Sequence[str] = ()) -> int:
        """Give the guest its side of the box network (the Network.Configure RPC): the address
        with prefix (``"10.0.2.15/24"``), the resolver address the container's resolv.conf
        names, extra /etc/hosts entries ``(address, names)``, and whether outbound connections
        and DNS are caught for the host (False: published ports only), and the IPv4 networks
        whose UDP is caught too (others are rejected in the guest). Returns the guest-local
        port the redirect uses.

        Raises:
            GuestError: ``ip`` or ``nft`` failed in the guest (their output quoted), the guest
                is configured differently already, or no answer within 60 s."""
        request = pb.NetConfigureRequest(address=address, resolver=resolver, egress=egress,
                                         udp_networks=list(udp_networks))
        for host_address, names in hosts:
            request.hosts.add(address=host_address, names=list(names))
        reply = self._unary(self._network.Configure, request, "network setup", timeout=60)
        return int(reply.catch_port)

    def exec(
        self,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> ExecSession:
        """Start ``args``; with ``tty``, on a pseudo-terminal of ``size`` (rows, cols)."""
        request = _exec_request(args, env=env, cwd=cwd, user=user, timeout=timeout,
                                stdin=stdin, tty=tty, size=size)
        reply = self._unary(self._execution.Exec, request, "exec", timeout=EXEC_START_TIMEOUT)
        return ExecSession(self, reply.exec_id, stdin)

    def attach(self, exec_id: str, *, stdin: bool = False) -> ExecSession:
        """Re-attach to an exec started earlier (e.g. by a host process that has restarted);
        output not yet delivered is still buffered in the agent."""
        return ExecSession(self, exec_id, stdin)

    def run(
        self, args: list[str], *, input: bytes | None = None, **kw: Any
    ) -> tuple[int | None, int | None, bool, bytes, bytes]:
        """Exec, feed input, collect output: (exit_code, signal, timed_out, stdout, stderr).
        With ``tty=True`` everything arrives as stdout (a terminal merges the streams).

        Without ``input`` it is one Run call (start, output and status in one stream); an
        agent older than Run (a snapshot saved by an older boxlite) gets Exec, Output and
        Wait, as with ``input``."""
        if input is None and self._has_run:
            ran = self._run_once(_exec_request(args, **kw))
            if ran is not None:
                return ran
        session = self.exec(args, stdin=input is not None, **kw)
        if input is not None:
            writer_error: list[BaseException] = []

            def feed() -> None:
                try:
                    session.write_stdin(input)
                    session.close_stdin()
                except BaseException as exc:
                    writer_error.append(exc)

            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
        out, err = bytearray(), bytearray()
        for stream, data in session.events():
            (out if stream == "stdout" else err).extend(data)
        status = session.wait()
        if input is not None:
            writer.join(timeout=30)
        return status.exit_code, status.signal, status.timed_out, bytes(out), bytes(err)

    def _run_once(
        self, request: pb.ExecRequest
    ) -> tuple[int | None, int | None, bool, bytes, bytes] | None:
        """The Run RPC; None when the agent does not have it (nothing was started then).
        The start is bounded as Exec's is (:data:`EXEC_START_TIMEOUT`); the run is not."""
        out, err = bytearray(), bytearray()
        started = False
        late = threading.Event()
        try:
            call = self._execution.Run(request)
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            raise GuestError(f"exec: this agent client is closed ({exc})") from None

        def give_up() -> None:
            late.set()
            call.cancel()

        timer = threading.Timer(EXEC_START_TIMEOUT, give_up)
        timer.daemon = True
        timer.start()
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    started = True
                    timer.cancel()
                elif kind == "output":
                    chunk = event.output
                    (err if chunk.stream == pb.OutputChunk.STDERR else out).extend(chunk.data)
                elif kind == "exit":
                    status = event.exit
                    return (status.exit_code if status.has_exit_code else None,
                            status.signal or None, status.timed_out, bytes(out), bytes(err))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED and not started:
                self._has_run = False
                return None
            if late.is_set() and not started:
                raise GuestError(f"the guest agent did not start the command within "
                                 f"{EXEC_START_TIMEOUT:g} s") from None
            raise self._error(exc, "exec") from None
        finally:
            timer.cancel()
        raise GuestError("exec: the guest agent ended the command's stream without its exit "
                         "status")

    def upload_tar(self, dest_dir: str, chunks: Iterable[bytes]) -> None:
        def messages() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(target_dir=dest_dir)
            for chunk in chunks:
                view = memoryview(chunk)
                for i in range(0, len(view), CHUNK):
                    yield pb.UploadChunk(data=bytes(view[i : i + CHUNK]))

        bound = transfer_timeout()
        try:
            self._files.Upload(messages(), timeout=bound)
        except grpc.RpcError as exc:
            raise self._error(exc, f"upload to {dest_dir} (bound {bound:g} s, "
                                   f"{ENV_TRANSFER_TIMEOUT})") from None

    def copy_in_tar(self, dest: str, manifest: bytes, chunks: Iterable[bytes]) -> int:
        """Send the tar ``chunks`` (one top entry; "." for a directory's contents) to be put
        at ``dest`` by docker cp's DEST_PATH rules (agent/files.py ``landing``); ``manifest``:
        its members (agent.proto UploadChunk.manifest), checked for conflicts first. Returns
        the entries written. Raises GuestPathError when the guest refuses the destination
        (the agent's reason: no such directory, a directory onto a file, ...), GuestError
        else."""

        def messages() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(dest=dest, manifest=manifest[:CHUNK])
            for i in range(CHUNK, len(manifest), CHUNK):
                yield pb.UploadChunk(manifest=manifest[i : i + CHUNK])
            for chunk in chunks:
                yield pb.UploadChunk(data=chunk)

        bound = transfer_timeout()
        try:
            return self._files.Upload(messages(), timeout=bound).entries
        except grpc.RpcError as exc:
            raise self._transfer_error(exc, f"copy to {dest}", bound) from None

    def download_tar(self, path: str) -> Iterator[bytes]:
        bound = transfer_timeout()
        try:
            for chunk in self._files.Download(pb.DownloadRequest(path=path), timeout=bound):
                yield chunk.data
        except grpc.RpcError as exc:
            raise self._transfer_error(exc, f"download of {path}", bound) from None

    def _transfer_error(self, exc: grpc.RpcError, what: str, bound: float) -> GuestError:
        """GuestPathError when the agent refused the path (FAILED_PRECONDITION: missing, not
        a directory, a directory onto a file...), else as :meth:`_error`."""
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            reason = exc.details() or ""  # the guest's text: shown inert
            return GuestPathError(f"copy: {what} in the box: "
                                  f"{reason if reason.isprintable() else repr(reason)}")
        return self._error(exc, f"{what} (bound {bound:g} s, {ENV_TRANSFER_TIMEOUT})")

    def probe(self, paths: Iterable[str] = ()) -> dict:
        reply = self._unary(
            self._guest.Probe, pb.ProbeRequest(paths=list(paths)), "probe", timeout=30
        )
        return {
            "mounts": [
                {"source": m.source, "target": m.target, "fstype": m.fstype, "options": m.options}
                for m in reply.mounts
            ],
            "cpu_count": reply.cpu_count,
            "mem_total_kb": reply.mem_total_kb,
            "kernel_release": reply.kernel_release,
            "hostname": reply.hostname,
            "container_root": reply.container_root,
            "stats": {
                s.path: {"exists": s.exists, "uid": s.uid, "gid": s.gid, "mode": s.mode}
                for s in reply.stats
            },
        }

    def shutdown(self) -> None:
        """Ask the guest to sync, unmount and power off; a VM vanishing mid-call is fine."""
        try:
            self._guest.Shutdown(pb.ShutdownRequest(), timeout=10)
        except (grpc.RpcError, ValueError):  # ValueError: this client was already closed
            pass

    def close(self) -> None:
        try:
            self._channel.close()
        finally:
            self._transport.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
