"""Per-box agent shim: owns the box's one virtio-serial stream, serves gRPC to many hosts.

The guest relays exactly one HTTP/2 connection per host attach, so a second host process
would wait for READY until the first let go. This process holds that attach (through a
private SerialBridge) with one gRPC channel, and serves BOXDIR/agent.grpc.sock to any number
of host clients, forwarding every method generically: requests and responses pass as raw
bytes (no (de)serializers), and unary and streaming RPCs are the same on the wire, so one
stream-stream handler fits all and the shim never needs the agent's protos.

Run: ``python -m boxlite_core.channel.shim --box-dir DIR [--port PATH] [--timeout S]``
(channel/shimctl.connect_shim starts it). It writes BOXDIR/shim.json {pid, start_time,
socket} once READY was seen and it serves; it exits on SIGTERM or when the port is gone for
good (the VM exited), removing its sockets and shim.json.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from ..errors import GuestError
from ..vmm.cappedio import CappedOutput
from ..vmm.procstat import start_time
from .bridge import SerialBridge
from .port import PORT_NAME, open_port
from .shimctl import (
    PRIVATE_BRIDGE_NAME,
    SHIM_CLAIM_NAME,
    SHIM_JSON,
    SHIM_LOG,
    SHIM_SOCK_NAME,
)
from .target import MAX_GUEST_MESSAGE

#: worker threads: each exec holds ~3 concurrent streams (Output, Stdin, Wait) for its life
WORKERS = 64
#: seconds a re-attach to the running guest may wait for READY before the shim hangs up and
#: attaches again (the guest normally answers a re-attach within ~0.1-0.5 s, even loaded; a
#: wedged QEMU port never does: notes/agent-stall.md)
READY_RETRY = 3.0
#: a time_remaining() above this means the host set no deadline
NO_DEADLINE = 10 * 365 * 86400.0
#: Calls that change nothing in the guest (Ping, Probe) or set an absolute state (Resize):
#: sent again when they fail UNAVAILABLE, as when a call goes into the port session that just
#: ended before the channel saw it end ("Stream removed": sendmsg EPIPE). Other calls are
#: never repeated by the retry policy (an Exec twice would run the program twice); gRPC's
#: transparent retry still covers any call that provably never reached the guest.
#: gRPC service config retryPolicy (gRFC A6, grpc.io/docs/guides/retry).
RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    ("boxlite.agent.v1.Guest", "Ping"),
    ("boxlite.agent.v1.Guest", "Probe"),
    ("boxlite.agent.v1.Execution", "Resize"),
)
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
    "retryPolicy": {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
}]})
_CHANNEL_OPTIONS = [
    # the guest's replies are hostile input: one message may not make the shim allocate more
    ("grpc.max_receive_message_length", MAX_GUEST_MESSAGE),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.initial_reconnect_backoff_ms", 50),
    # Despite its name this is gRPC's *minimum connect timeout* (floored at 100 ms): the
    # time a connection attempt gets to finish the HTTP/2 handshake. At 50 the guest had
    # ~0.1 s to answer the preface; under TCG load it often needs longer, so every attempt
    # was dropped and re-made, each drop a port detach that can wedge the port (see
    # notes/agent-stall.md). 20 s is gRPC's default; reconnects stay fast (backoff above).
    ("grpc.min_reconnect_backoff_ms", 20000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),  # one HTTP/2 session: the bridge relays one
]
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
#: metadata gRPC sets itself; forwarding it would confuse the upstream call
_DROP_METADATA = {"user-agent", ":authority", "te", "content-type"}
#: cap of shim.log and of each of its rotated copies (shim.log.1, .2), bytes. Its lines are
#: few and short, but a guest adds some at will (every port re-open it forces logs two) and
#: the file outlives boots, so it is bounded like the console: at most 3 MiB per box.
LOG_MAX_BYTES = 1024 * 1024
LOG_BACKUPS = 2


def _log(msg: str) -> None:
    now = time.time()
    stamp = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"
    print(f"{stamp} shim[{os.getpid()}]: {msg}", flush=True)


def _unary_request_methods() -> set[str]:
    """Full names of the agent's methods whose request is a single message. Only a speed-up
    (no request-iterator thread per call); any other method is forwarded as a stream."""
    try:
        from ..proto import agent_pb2
    except Exception:  # stubs unusable here: the generic path still forwards everything
        return set()
    names = set()
    for service in agent_pb2.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            if not m.client_streaming:
                names.add(f"/{service.full_name}/{m.name}")
    return names


class Forwarder(grpc.GenericRpcHandler):
    """Every method of every service, forwarded byte for byte over the guest channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._unary_request = _unary_request_methods()

    @staticmethod
    def _call_args(context: grpc.ServicerContext) -> dict:
        metadata = [
            (k, v)
            for k, v in (context.invocation_metadata() or ())
            if k not in _DROP_METADATA and not k.startswith("grpc-")
        ]
        remaining = context.time_remaining()
        return {
            # no deadline reads as a huge remaining time (~infinite future): pass None
            "timeout": remaining if remaining < NO_DEADLINE else None,
            "metadata": metadata or None,
            # a guest re-attach in progress is waited for, not failed (the client's own
            # deadline still applies, and the shim exits when the VM is gone)
            "wait_for_ready": True,
        }

    @staticmethod
    def _link(context: grpc.ServicerContext, call: grpc.Call) -> bool:
        """Cancel the guest side when the host gives up. add_callback() refuses (False) once
        the host's RPC has already ended; the upstream call must not then run on unseen, e.g.
        an Output stream would take buffered bytes from the agent and drop them."""
        if context.add_callback(call.cancel):
            return True
        call.cancel()
        return False

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.CANCELLED and not context.is_active():
            return  # our own cancel after the host went away
        context.abort(code, details or "")

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if method in self._unary_request:
            upstream = self._channel.unary_stream(method)
            make_handler = grpc.unary_stream_rpc_method_handler
        else:
            upstream = self._channel.stream_stream(method)
            make_handler = grpc.stream_stream_rpc_method_handler

        def behavior(request, context: grpc.ServicerContext):
            # ``request`` is one message (unary) or an iterator of them (streaming): the
            # upstream callable was picked to match, so forwarding is the same either way.
            call = upstream(request, **self._call_args(context))
            if not self._link(context, call):
                return
            try:
                yield from call
            except grpc.RpcError as exc:
                self._abort(context, exc)

        return make_handler(behavior)


class Shim:
    def __init__(
        self, box_dir: Path, port: Path, timeout: float, ready_retry: float | None = None
    ) -> None:
        self.box_dir = box_dir.absolute()
        self.port = port.absolute()
        self.timeout = timeout
        #: a restored VM's agent may still serve its saved host's session, and QEMU tells
        #: it the host changed only if the saved and the new host's connection states differ:
        #: when READY does not come, a detach + re-attach tells it
        self.ready_retry = ready_retry
        self.socket_path = self.box_dir / SHIM_SOCK_NAME
        self.bridge_path = self.box_dir / PRIVATE_BRIDGE_NAME
        self.done = threading.Event()
        self.exit_reason = ""
        self.bridge: SerialBridge | None = None
        self.channel: grpc.Channel | None = None
        self.server: grpc.Server | None = None

    def _alive(self) -> bool:
        return not self.done.is_set()

    def _port_lost(self, reason: str) -> None:
        self.exit_reason = reason
        self.done.set()

    def start(self) -> None:
        for path in (self.socket_path, self.bridge_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        first = open_port(
            self.port,
            deadline=time.monotonic() + self.timeout,
            is_alive=self._alive,
            console_tail=lambda: "",
            ready_timeout=self.ready_retry,
            log=_log,
        )
        _log(f"READY on {self.port}")
        self.bridge = SerialBridge(
            self.port,
            self.bridge_path,
            first,
            reconnect_timeout=30.0,
            is_alive=self._alive,
            console_tail=lambda: "",
            eager=True,
            on_port_lost=self._port_lost,
            reopen_delay=0.2,
            ready_retry=READY_RETRY,
            log=_log,
        )
        self.channel = grpc.insecure_channel(self.bridge.target, options=_CHANNEL_OPTIONS)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="shim-rpc"),
            handlers=[Forwarder(self.channel)],
            options=_SERVER_OPTIONS,
        )
        if not self.server.add_insecure_port(f"unix:{self.socket_path}"):
            raise GuestError(f"could not listen on {self.socket_path}")
        self.server.start()
        os.chmod(self.socket_path, 0o600)
        info = {
            "pid": os.getpid(),
            "start_time": start_time(os.getpid()),
            "socket": str(self.socket_path),
        }
        tmp = self.box_dir / f".{SHIM_JSON}.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.box_dir / SHIM_JSON)  # readers never see half a file
        _log(f"serving on {self.socket_path}")

    def close(self) -> None:
        self.done.set()
        json_path = self.box_dir / SHIM_JSON
        with contextlib.suppress(OSError, ValueError):
            if json.loads(json_path.read_text()).get("pid") == os.getpid():
                json_path.unlink()
        if self.server is not None:
            self.server.stop(grace=0.5).wait(2)
        if self.channel is not None:
            self.channel.close()
        if self.bridge is not None:
            self.bridge.close()
        for path in (self.socket_path, self.bridge_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if _CLAIM.getsockname():  # a standby's claim (ours: the path is bound by this socket)
            with contextlib.suppress(FileNotFoundError):
                (self.box_dir / SHIM_CLAIM_NAME).unlink()
        _CLAIM.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box-dir", type=Path)
    ap.add_argument("--standby", action="store_true",
                    help="start up, then read the box to serve from stdin: one JSON line "
                         "{box_dir, port, timeout, ready_retry}; exit at EOF without one")
    ap.add_argument("--port", type=Path, help="the agent port socket (default BOXDIR/agent.port)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for READY")
    ap.add_argument("--ready-retry", type=float, default=None,
                    help="re-attach the port when READY takes longer (a restored VM)")
    ap.add_argument("--log-max-bytes", type=int, default=LOG_MAX_BYTES,
                    help="cap of BOXDIR/shim.log and each of its 2 rotated copies")
    args = ap.parse_args(argv)
    if args.standby and not _assigned(args):
        return 0  # its starter exited or took another: nothing to serve
    if args.box_dir is None:
        ap.error("--box-dir is required (or --standby)")
    if args.log_max_bytes <= 0:
        ap.error(f"--log-max-bytes {args.log_max_bytes}: must be > 0")
    os.umask(0o177)  # its sockets and shim.json are for this user only
    output: CappedOutput | None = None
    try:
        output = CappedOutput(args.box_dir / SHIM_LOG, args.log_max_bytes, LOG_BACKUPS)
    except OSError as exc:  # keep the inherited (uncapped) output rather than not serve
        _log(f"shim.log not capped: {exc}")
    try:
        return _serve(args)
    finally:
        if output is not None:
            output.close()


#: a standby shim's claim on its box (see _assigned)
_CLAIM = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _assigned(args: argparse.Namespace) -> bool:
    """A standby shim (shimctl.warm_shim) waits here for its box; False at EOF."""
    line = sys.stdin.buffer.readline()
    if not line:
        return False
    job = json.loads(line)
    args.box_dir = Path(job["box_dir"])
    args.port = Path(job["port"])
    args.timeout = float(job["timeout"])
    args.ready_retry = job.get("ready_retry")
    # first: a socket bound in the box directory names this process as the box's
    # (shimctl.SHIM_CLAIM_NAME); kept open until exit
    claim_path = args.box_dir / SHIM_CLAIM_NAME
    with contextlib.suppress(FileNotFoundError):
        claim_path.unlink()
    _CLAIM.bind(str(claim_path))
    # what an unassigned shim had: its box's log (CappedOutput caps it right after)
    log = os.open(args.box_dir / SHIM_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the starter may go now: its pipe is not this shim's stdin any more
    os.close(null)
    return True


def _serve(args: argparse.Namespace) -> int:
    shim = Shim(args.box_dir, args.port or args.box_dir / PORT_NAME, args.timeout,
                args.ready_retry)

    def on_signal(signum: int, _frame: object) -> None:
        shim.exit_reason = f"signal {signal.Signals(signum).name}"
        shim.done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to shim.log
    try:
        shim.start()
    except (GuestError, OSError) as exc:
        _log(f"could not start: {exc}")
        shim.close()
        return 1
    while not shim.done.wait(1.0):
        pass
    _log(f"exiting: {shim.exit_reason or 'done'}")
    shim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
