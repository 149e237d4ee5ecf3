"""gRPC servicers: thin translations between agent.proto and the agent's modules."""

from __future__ import annotations

import os
import threading
import time

import grpc

from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as rpc
from . import VERSION, container, files, identity, network, procs, terminal
from .pid1 import STARTED, Reaper, log, power_off

MERGE_LIMIT = 1024 * 1024  # bytes per OutputChunk when coalescing


class Agent:
    """Shared state of one agent process."""

    def __init__(self, state_dir: str, reaper: Reaper, zygote: procs.Zygote | None = None) -> None:
        self.state_dir = state_dir
        self.reaper = reaper
        self.procs = procs.ProcessTable(reaper, zygote)
        self.root: str | None = None
        self.init_lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.net = network.NetStack(reaper, state_dir)
        # Only the guest's PID 1 steps the wall clock: a native agent (tests) shares the host's.
        self.set_clock = identity.step_realtime if os.getpid() == 1 else None

    def require_root(self, context) -> str:
        if self.root is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the box is not initialised: the host must call Init first",
            )
        return self.root

    def shutdown(self, reason: str) -> None:
        """Kill every exec, sync, unmount, power off (exit when not PID 1)."""
        for proc in list(self.procs._procs.values()):
            proc.kill(9)
        os.sync()
        container.unmount_all(self.state_dir)
        power_off(reason)


def _abort_for(context, exc: Exception) -> None:
    if isinstance(exc, KeyError):
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc))
    if isinstance(exc, (procs.ExecError, files.TransferError, ValueError, LookupError)):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, OSError):
        context.abort(grpc.StatusCode.INTERNAL, str(exc))
    raise exc


class GuestService(rpc.GuestServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def Ping(self, request, context):
        try:
            with open("/proc/uptime") as fh:
                uptime = float(fh.read().split()[0])
        except OSError:
            uptime = 0.0
        return pb.PingReply(
            version=VERSION,
            uptime=uptime,
            agent_uptime=time.monotonic() - STARTED,
            initialized=self.agent.root is not None,
        )

    def Init(self, request, context):
        with self.agent.init_lock:
            if self.agent.root is not None:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the box is already initialised (root {self.agent.root})",
                )
            try:
                # First, before any mount: nothing of the Init may run on the image's RNG state.
                if request.HasField("identity"):
                    identity.apply_identity(request.identity, set_clock=self.agent.set_clock)
                root = container.init_container(self.agent.state_dir, request)
            except Exception as exc:
                log(f"Init failed: {exc}")
                container.unmount_all(self.agent.state_dir)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Init failed: {exc}")
            self.agent.root = root
        return pb.InitReply(container_root=root)

    def Reseed(self, request, context):
        try:
            applied = identity.apply_identity(
                request.identity, root=self.agent.root, set_clock=self.agent.set_clock
            )
            if request.copy:
                orphans = self.agent.procs.orphan_all()
                log(f"copy of a snapshot: output of {orphans} inherited exec(s) discarded")
        except Exception as exc:
            log(f"Reseed failed: {exc}")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Reseed failed: {exc}")
        return pb.ReseedReply(boot_id=applied.boot_id, clock_step=applied.clock_step)

    def Shutdown(self, request, context):
        # Reply first; the power-off happens once the reply had a moment to leave.
        def later() -> None:
            time.sleep(0.2)
            self.agent.shutdown("Shutdown requested by the host")

        threading.Thread(target=later, daemon=True).start()
        return pb.ShutdownReply()

    def Probe(self, request, context):
        reply = pb.ProbeReply(
            cpu_count=os.cpu_count() or 0,
            kernel_release=os.uname().release,
            hostname=os.uname().nodename,
            container_root=self.agent.root or "",
        )
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 4:
                    src, tgt, fstype, opts = (p.replace("\\040", " ") for p in parts[:4])
                    reply.mounts.add(source=src, target=tgt, fstype=fstype, options=opts)
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    reply.mem_total_kb = int(line.split()[1])
        root = self.agent.root or "/"
        for path in request.paths:
            entry = reply.stats.add(path=path)
            try:
                st = os.stat(container.safe_join(root, path))
            except (OSError, ValueError):
                continue
            entry.exists = True
            entry.uid, entry.gid, entry.mode = st.st_uid, st.st_gid, st.st_mode
        return reply


class ExecutionService(rpc.ExecutionServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _start(self, request, context) -> procs.Process:
        root = self.agent.require_root(context)
        try:
            return self.agent.procs.start(
                root,
                list(request.args),
                dict(request.env),
                request.cwd,
                request.user,
                request.timeout,
                request.stdin,
                tty=request.tty,
                size=terminal.clamp_size(request.size.rows, request.size.cols),
            )
        except Exception as exc:
            _abort_for(context, exc)
            raise

    def Exec(self, request, context):
        proc = self._start(request, context)
        return pb.ExecReply(exec_id=proc.exec_id, pid=proc.init_pid)

    def _get(self, context, exec_id: str) -> procs.Process:
        try:
            return self.agent.procs.get(exec_id)
        except KeyError as exc:
            _abort_for(context, exc)
            raise

    @staticmethod
    def _chunks(proc: procs.Process, context):
        """The process's output as OutputChunks, until its pipes close (or the host left)."""
        while context.is_active():
            items = proc.output.take(0.5)
            if items is None:
                return
            # Coalesce consecutive chunks of one stream: fewer, larger messages.
            merged: list[tuple[int, bytearray]] = []
            for stream, data in items:
                if merged and merged[-1][0] == stream and len(merged[-1][1]) < MERGE_LIMIT:
                    merged[-1][1].extend(data)
                else:
                    merged.append((stream, bytearray(data)))
            for stream, data in merged:
                yield pb.OutputChunk(stream=stream, data=bytes(data))

    @staticmethod
    def _status(proc: procs.Process) -> pb.WaitReply:
        return pb.WaitReply(
            has_exit_code=proc.exit_code is not None,
            exit_code=proc.exit_code or 0,
            signal=proc.signal or 0,
            timed_out=proc.timed_out,
        )

    def Output(self, request, context):
        yield from self._chunks(self._get(context, request.exec_id), context)

    def Run(self, request, context):
        if request.stdin:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Run takes no stdin: use Exec, Stdin, Output and Wait")
        proc = self._start(request, context)
        yield pb.RunEvent(started=pb.ExecReply(exec_id=proc.exec_id, pid=proc.init_pid))
        for chunk in self._chunks(proc, context):
            yield pb.RunEvent(output=chunk)
        # the pipes closed: the process and everything it left are gone; its status follows
        while context.is_active():
            if proc.done.wait(0.5):
                yield pb.RunEvent(exit=self._status(proc))
                return

    def Stdin(self, request_iterator, context):
        proc = None
        try:
            for chunk in request_iterator:
                if proc is None:
                    proc = self._get(context, chunk.exec_id)
                proc.write_stdin(chunk.data, chunk.close)
        except (procs.ExecError, OSError) as exc:
            _abort_for(context, exc)
        return pb.StdinReply()

    def Wait(self, request, context):
        proc = self._get(context, request.exec_id)
        if not proc.done.wait(request.timeout if request.timeout > 0 else None):
            return pb.WaitReply(running=True)
        return self._status(proc)

    def Kill(self, request, context):
        proc = self._get(context, request.exec_id)
        proc.kill(request.signal or 15)
        return pb.KillReply()

    def Resize(self, request, context):
        proc = self._get(context, request.exec_id)
        try:
            proc.resize(request.size.rows, request.size.cols)
        except procs.ExecError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.ResizeReply()


# -- Files: bulk messages as encoded bytes ---------------------------------------------------
#
# Why: under TCG every pass of the guest's Python over a payload costs ~0.2 s per 50 MiB, and
# protobuf's message objects add two (set a bytes field: a copy into the message; serialize:
# another; parsing likewise). The Files service is registered without (de)serializers for
# its bulk messages: a data-only UploadChunk is read in place (its data field is the message's
# tail) and a DownloadChunk is encoded by hand (the same bytes protobuf would write). Every
# other message goes through protobuf as usual.

_UPLOAD_DATA_TAG = 0x12  # UploadChunk.data: field 2, length-delimited
_DOWNLOAD_DATA_TAG = b"\x0a"  # DownloadChunk.data: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _upload_chunk(raw: bytes) -> pb.UploadChunk | memoryview:
    """An encoded UploadChunk: its data, uncopied, when that is all it holds; else parsed."""
    if raw[:1] and raw[0] == _UPLOAD_DATA_TAG:
        size, shift, at = 0, 0, 1
        while at < len(raw) and at <= 5:
            byte = raw[at]
            size |= (byte & 0x7F) << shift
            at += 1
            if not byte & 0x80:
                if at + size == len(raw):
                    return memoryview(raw)[at:]
                break
            shift += 7
    return pb.UploadChunk.FromString(raw)


def _download_chunk(data: bytes) -> bytes:
    """DownloadChunk(data=data), encoded (proto3 leaves an empty field out)."""
    return b"".join((_DOWNLOAD_DATA_TAG, _varint(len(data)), data)) if data else b""


def add_files_service(servicer: FilesService, server: grpc.Server) -> None:
    """rpc.add_FilesServicer_to_server, with Upload's requests and Download's replies as
    encoded bytes (above)."""
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(
            servicer.Upload, response_serializer=pb.UploadReply.SerializeToString
        ),
        "Download": grpc.unary_stream_rpc_method_handler(
            servicer.Download, request_deserializer=pb.DownloadRequest.FromString
        ),
    }
    service = "boxlite.agent.v1.Files"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class FilesService(rpc.FilesServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def Upload(self, request_iterator, context):
        root = self.agent.require_root(context)
        requests = map(_upload_chunk, request_iterator)
        first = next(requests, None)
        if not isinstance(first, pb.UploadChunk) or not (first.target_dir or first.dest):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Upload: the first message must carry dest or target_dir",
            )

        manifest = [first.manifest]
        msg: pb.UploadChunk | memoryview | None = first
        while isinstance(msg, pb.UploadChunk) and msg.manifest and not msg.data:
            msg = next(requests, None)  # the manifest comes before the data
            if isinstance(msg, pb.UploadChunk):
                manifest.append(msg.manifest)

        def chunks():
            if msg is not None:
                yield _data(msg)
                yield from map(_data, requests)

        try:
            count = files.upload(
                self.agent.reaper,
                root,
                first.target_dir,
                chunks(),
                dest=first.dest,
                manifest=b"".join(manifest),
            )
        except Exception as exc:
            _abort_for(context, exc)
        return pb.UploadReply(entries=count)

    def Download(self, request, context):
        root = self.agent.require_root(context)
        try:
            stream = files.download(self.agent.reaper, root, request.path)
            for chunk in stream:
                yield _download_chunk(chunk)
        except Exception as exc:
            _abort_for(context, exc)


def _data(chunk: pb.UploadChunk | memoryview) -> bytes | memoryview:
    return chunk.data if isinstance(chunk, pb.UploadChunk) else chunk


class NetworkService(rpc.NetworkServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def Configure(self, request, context):
        try:
            port = self.agent.net.configure(request, self.agent.root)
        except Exception as exc:
            log(f"network Configure failed: {exc}")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"network: {exc}")
        return pb.NetConfigureReply(catch_port=port)

    def Events(self, request, context):
        yield from self.agent.net.events(context.is_active)

    def Relay(self, request_iterator, context):
        yield from self.agent.net.relay(request_iterator)

    def Answer(self, request, context):
        self.agent.net.answer(request)
        return pb.NetAnswerReply()

    def Dial(self, request_iterator, context):
        yield from self.agent.net.dial(request_iterator)

    def Datagram(self, request, context):
        try:
            self.agent.net.datagram(request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.NetDatagramReply()


def start_server(agent: Agent, socket_path: str) -> grpc.Server:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(
        ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    rpc.add_GuestServicer_to_server(GuestService(agent), server)
    rpc.add_ExecutionServicer_to_server(ExecutionService(agent), server)
    add_files_service(FilesService(agent), server)
    rpc.add_NetworkServicer_to_server(NetworkService(agent), server)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    agent.server = server
    return server
