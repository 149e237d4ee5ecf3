"""Box: one micro-VM and the container inside it, as the user drives it.

A Box object is a view on a record plus, in the process that started or attached it, the live
VM handle and agent connection. Another process gets its own Box for the same record and
re-attaches (backend.attach + a fresh agent connection), so boxes outlive the program that
made them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import BoxliteError, ConfigError, GuestError, NotFoundError, StateError
from ..images.model import ImageConfig
from ..models import BoxStatus, Capability, ExecResult, ExitStatus, check_timeout
from ..vmm import consolelog
from .cleanup import (
    CleanupGuard,
    kill_vmm,
    leftover_processes,
    settle_abandoned,
    starter_is_elsewhere,
    stop_box_processes,
    stop_helpers,
    stop_leftovers,
)
from .pipeline import CONSOLE_LOG, ProgressFn, StartContext, boot_timeout, console_tail, run_stages
from .records import BoxRecord, process_identity

if TYPE_CHECKING:
    from ..vmm.base import VmHandle
    from .runtime import Runtime

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 1024 * 1024
#: seconds a re-attach waits for the agent of an already running VM
ATTACH_TIMEOUT = 30.0
#: seconds a starter that released the box lock gets to finish exiting (see _settle_abandoned)
STARTER_EXIT_GRACE = 5.0
#: stop reasons Box.stop/kill record: someone asked for the box to go down
ON_REQUEST = ("stopped on request", "killed on request")
#: seconds an exec that lost its command waits for a concurrent stop/remove to finish, to
#: tell "removed" from "stopped" (Runtime.remove stops the box, then deletes, under one lock)
SETTLE_WAIT = 30.0


class BoxGoneError(StateError):
    """The box was removed (``boxlite rm -f``) or stopped by someone else while a command ran
    in it: its shutdown SIGKILLed the command. Raised instead of a bare exit status 137.

    ``exit_code`` is 137 (128 + SIGKILL): what the command's status would have said, so
    scripts that test for "killed" still see it; the error line says why.
    """

    exit_code = 137


def is_clean_exit(reason: str | None) -> bool:
    """Did the VM power off by itself (guest shutdown) rather than crash or get killed?"""
    if not reason:
        return False
    text = reason.lower()
    if "signal" in text or "killed" in text or "crash" in text or "panic" in text:
        return False
    return any(
        word in text
        for word in ("exit code 0", "exited with 0", "status 0", "powered off", "shutdown",
                     "exited normally", "code 0")
    )


def _probe_is_dir(reply: Mapping[str, Any], path: str) -> bool | None:
    """Interpret AgentClient.probe output for one path: True/False, or None if absent."""
    found = (reply.get("stats") or {}).get(path)
    if not found or not found.get("exists"):
        return None
    return stat.S_ISDIR(int(found.get("mode") or 0))


class Execution:
    """A running command: stream its output, feed its stdin, wait for it.

    Errors from a VM that died underneath become GuestError naming the box, and the box
    record is settled (Failed, or Stopped after a clean power-off).
    """

    def __init__(self, box: Box, session: Any, args: Sequence[str]) -> None:
        self.box = box
        self.session = session
        self.args = list(args)
        self._failed = False

    def _wrap(self, exc: BaseException) -> BaseException:
        if self._failed:
            return exc
        self._failed = True
        return self.box._exec_failed(exc)

    def events(self) -> Iterator[tuple[str, bytes]]:
        """("stdout" | "stderr", bytes) chunks, in the order they arrive, until both close."""
        try:
            yield from self.session.events()
        except GeneratorExit:
            raise
        except Exception as exc:
            raise self._wrap(exc) from exc

    def write_stdin(self, data: bytes) -> None:
        try:
            self.session.write_stdin(data)
        except Exception as exc:
            raise self._wrap(exc) from exc

    def close_stdin(self) -> None:
        try:
            self.session.close_stdin()
        except Exception as exc:
            raise self._wrap(exc) from exc

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """The command's status. TimeoutError if it still runs after ``timeout`` seconds;
        BoxGoneError if a concurrent stop/remove of the box killed it."""
        try:
            status = self.session.wait(timeout)
        except TimeoutError:
            raise  # still running: not an exec failure
        except Exception as exc:
            raise self._wrap(exc) from exc
        if status.signal == signal.SIGKILL and not status.timed_out:
            gone = self.box._gone_error()
            if gone is not None:
                raise gone
        return ExitStatus(status.exit_code, status.signal, status.timed_out)

    def kill(self, sig: int = 15) -> None:
        with contextlib.suppress(Exception):
            self.session.kill(sig)


class Box:
    """Use through :class:`~boxlite_core.runtime.runtime.Runtime` (``create`` / ``get``)."""

    def __init__(self, runtime: Runtime, record: BoxRecord) -> None:
        self._rt = runtime
        self.id = record.id
        self.name = record.name
        self._record = record
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fh: Any = None
        self._handle: VmHandle | None = None
        self._client: Any = None
        self._sharer_name: str | None = None

    def __repr__(self) -> str:
        return f"<Box {self.name} {self.id} {self._record.status.value}>"

    # -- record ----------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self._rt.box_dir(self.id)

    def refresh(self) -> BoxRecord:
        self._record = self._rt.store.get(self.id)
        return self._record

    @property
    def record(self) -> BoxRecord:
        return self.refresh()

    @property
    def status(self) -> BoxStatus:
        return self.refresh().status

    def info(self) -> dict[str, Any]:
        record = self.refresh()
        data = record.to_dict()
        data["dir"] = str(self.dir)
        data["stage_timings"] = record.stage_timings
        data["stage"] = record.stage  # while Starting: where it is; after a failure: where
        data["abandoned"] = record.abandoned  # Starting, but its starter process is gone
        return data

    def metrics(self) -> dict[str, Any]:
        record = self.refresh()
        counters = dict(record.state.get("counters") or {})
        return {
            "stage_timings": record.stage_timings,
            "execs": int(counters.get("execs", 0)),
            "exec_errors": int(counters.get("exec_errors", 0)),
            "boots": int(record.state.get("boots", 0)),
            "failures": record.failures,
        }

    def logs(self, tail: int | None = None, follow: bool = False) -> Any:
        """The guest serial console of the current (or last) boot, across its rotated files.

        ``tail``: only the last N lines (read backwards: memory does not grow with the log).
        Without ``follow``: a str (at most 3 times the box's cap, ``console_log_max_mib``).
        With ``follow``: an iterator of str chunks that goes on with new output, across
        rotation, until the box stops. The text is the guest's, undecoded bytes replaced but
        control characters kept: use :func:`boxlite_core.vmm.consolelog.neutralise` before
        showing it on a terminal. ConfigError for a negative ``tail``."""
        chunks = self.log_chunks(tail=tail, follow=follow)
        if not follow:
            return b"".join(chunks).decode(errors="replace")
        return (chunk.decode(errors="replace") for chunk in chunks)

    def log_chunks(self, tail: int | None = None, follow: bool = False) -> Iterator[bytes]:
        """Raw console bytes for :meth:`logs` (and ``boxlite logs``), in bounded blocks."""
        if tail is not None and tail < 0:
            raise ConfigError(f"logs: tail={tail}: give a number of lines, 0 or more")
        path = self.dir / CONSOLE_LOG
        if follow:
            return consolelog.follow(path, self._console_done, tail=tail)
        if tail is not None:
            return iter([consolelog.tail_bytes(path, tail)])
        return consolelog.iter_log(path)

    def _console_done(self) -> bool:
        """No more console output will come: the box is not running, or its VM is gone."""
        if self.status is not BoxStatus.RUNNING:
            return True
        if self._handle is None:
            self._handle = self._attach_handle()  # once: polled every 0.2 s while idle
        return self._handle is None or not self._handle.is_running()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise start/stop/remove of this box across threads and processes (flock)."""
        with self._lock:
            if self._lock_depth == 0:
                fh = self._rt.lock_path(self.id).open("a")
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._lock_fh = fh
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._lock_fh.close()
                    self._lock_fh = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, progress: ProgressFn | None = None) -> Box:
        """Boot the box (Configured, Stopped or Failed → Starting → Running). Restart keeps
        its data.

        The record says Starting, naming this process, before anything is spawned, and the
        VMM's pid + start time right after launch, so a process killed mid-start leaves a
        record any later process can clean up (see cleanup.settle_abandoned). A box another
        live process is starting is waited for (the per-box lock), then re-attached.

        Raises StateError (stopping, or a live starter that does not hold the lock),
        ConfigError (backend unavailable) and whatever the failing stage raised, prefixed
        with the box and the stage; the record is then Failed.
        """
        rt = self._rt
        seen = self.refresh()
        if seen.status is BoxStatus.STARTING and starter_is_elsewhere(seen) and progress:
            with contextlib.suppress(Exception):
                progress(f"waiting: pid {(seen.starter or {}).get('pid')} is starting this "
                         f"box (stage {seen.stage})", None)
        with self.exclusive():
            record = self.refresh()
            if record.status is BoxStatus.RUNNING:
                self._live_client()  # re-attach (or find it dead and say so)
                return self
            if record.status is BoxStatus.STARTING:
                record = self._settle_abandoned(record)
            if not record.status.startable:
                raise StateError(
                    f"box {self.name} is {record.status.value}; wait for it to finish stopping"
                )
            backend_name = record.backend or rt.plugins.select_backend(record.options)
            backend = rt.plugins.backend(backend_name)
            probe = backend.probe()
            if not probe.available:
                raise ConfigError(
                    f"backend {backend_name!r} is not available here: {probe.reason}"
                    + (f"; {probe.fix}" if probe.fix else "")
                )
            if record.backend != backend_name:
                record = rt.store.update(self.id, backend=backend_name)
            if self.dir.exists():  # what an earlier run left (an old boxlite, a crash)
                stop_box_processes(rt, record, self.dir)
            record = rt.store.begin_start(self.id, process_identity())
            ctx = StartContext(
                runtime=rt, record=record, box_dir=self.dir, backend=backend, progress=progress
            )
            with CleanupGuard(ctx):
                run_stages(ctx)
                assert ctx.handle is not None and ctx.spec is not None
                record = rt.store.set_status(
                    self.id,
                    BoxStatus.RUNNING,
                    pid=ctx.handle.pid,
                    started_at=time.time(),
                    stopped_at=None,
                    error=None,
                    image_digest=getattr(ctx.image, "digest", record.image_digest),
                    state={
                        "stage_timings": dict(ctx.timings),
                        "agent": ctx.spec.agent.to_dict(),
                        "sharer": ctx.sharer_name,
                        "kit_id": getattr(ctx.kit, "kit_id", None),
                        "image_config": ctx.image.config.to_dict()
                        if hasattr(ctx.image, "config")
                        else record.state.get("image_config"),
                        "boots": int(record.state.get("boots", 0)) + 1,
                        "failed_stage": None,
                        "stop_reason": None,
                        "stage": None,  # started: no stage is running
                    },
                )
            self._record = record
            self._handle, self._client, self._sharer_name = ctx.handle, ctx.client, ctx.sharer_name
        rt.db.bump("boxes_started")
        rt.plugins.notify("started", box=record.to_dict(), stage_timings=dict(ctx.timings))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the guest down cleanly (agent sync + power-off), then stop the VM. Idempotent.

        ``timeout``: seconds (>= 0) for each of the clean shutdown and the forced stop;
        ConfigError if negative or NaN.
        """
        check_timeout("timeout", timeout, allow_zero=True)
        rt = self._rt
        with self.exclusive():
            record = self.refresh()
            if record.status is BoxStatus.STARTING:
                record = self._settle_abandoned(record)
            if record.status in (BoxStatus.CONFIGURED, BoxStatus.STOPPED):
                self._kill_vm()  # none should run; if an old start left one, it goes
                self.teardown_host_side()
                return
            if record.status is BoxStatus.FAILED:
                self._kill_vm()
                self.teardown_host_side()
                return
            if record.status is BoxStatus.RUNNING:
                record = rt.store.set_status(self.id, BoxStatus.STOPPING)
            handle = self._handle or self._attach_handle()
            if handle is not None and handle.is_running():
                client = self._client
                if client is None:
                    with contextlib.suppress(Exception):
                        client = self._connect(handle, timeout=min(timeout, ATTACH_TIMEOUT))
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.shutdown()
                if not handle.wait(timeout):
                    handle.stop(timeout)
            self.teardown_host_side()
            self._settle(BoxStatus.STOPPED, "stopped on request")

    def kill(self) -> None:
        """Stop the VM at once (no guest shutdown: unsynced writes may be lost)."""
        with self.exclusive():
            record = self.refresh()
            if record.status is BoxStatus.STARTING:
                record = self._settle_abandoned(record)
            self._kill_vm()
            self.teardown_host_side()
            if record.status not in (BoxStatus.FAILED, BoxStatus.CONFIGURED, BoxStatus.STOPPED):
                self._settle(BoxStatus.STOPPED, "killed on request")

    def _settle_abandoned(self, record: BoxRecord) -> BoxRecord:
        """A Starting record seen with the box lock held: its starter died (a live start
        holds the lock), so stop what the box directory names and mark it Failed.

        A dying process drops its locks before /proc shows it gone, so a starter that still
        looks alive gets a few seconds to finish exiting before this refuses."""
        deadline = time.monotonic() + STARTER_EXIT_GRACE
        while starter_is_elsewhere(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        if starter_is_elsewhere(record):
            starter = record.starter or {}
            raise StateError(
                f"box {self.name} is starting in process {starter.get('pid')} (stage "
                f"{record.stage}), which does not hold the box lock {self._rt.lock_path(self.id)}; "
                f"wait for it, or end that process and retry"
            )
        self.detach()
        record = settle_abandoned(self._rt, record)
        self._record = record
        return record

    def pause(self) -> None:
        """Freeze the VM's vCPUs (backends declaring PAUSE). The box stays Running; execs wait."""
        self._require_pause()
        self._running_handle().pause()

    def resume(self) -> None:
        """Let a paused VM run again."""
        self._require_pause()
        self._running_handle().resume()

    def _require_pause(self) -> None:
        """Refuse up front, naming the backend, rather than let a handle raise halfway."""
        name = self._record.backend or self._rt.plugins.select_backend(self._record.options)
        if Capability.PAUSE not in self._rt.plugins.backend(name).capabilities():
            raise ConfigError(
                f"box {self.name}: backend {name!r} cannot pause a VM (it does not declare "
                "the 'pause' capability); use a backend that does (qemu, libvirt)"
            )

    def _running_handle(self) -> VmHandle:
        if self.status is not BoxStatus.RUNNING:
            raise StateError(f"box {self.name} is {self.status}, not running; start it first")
        handle = self._handle or self._attach_handle()
        if handle is None or not handle.is_running():
            raise StateError(f"box {self.name}: its VM is gone; see `boxlite logs {self.name}`")
        self._handle = handle
        return handle

    def remove(self, force: bool = False) -> None:
        self._rt.remove(self.id, force=force)

    def detach(self) -> None:
        """Forget the live connection in this process; the VM keeps running. Cheap, and no
        longer needed for other processes to reach the box: the per-box agent shim serves any
        number of them, and closing this client leaves the shim running."""
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            if self._handle is not None:
                with contextlib.suppress(Exception):
                    self._handle.release()
            self._client = None
            self._handle = None

    def teardown_host_side(self) -> None:
        """Close the agent, release the handle, stop the agent shim and sharer helpers (from
        any process), then any session leader still naming the box directory."""
        self.detach()
        stop_helpers(self._rt, self._record, self.dir, self._sharer_name)
        self._sharer_name = None
        with contextlib.suppress(Exception):
            stop_leftovers(leftover_processes(self.dir))

    def _kill_vm(self) -> None:
        """Kill the VM by every name the box has for it (handle, backend state file, the
        VMM identity in the record, the plan's pidfile)."""
        kill_vmm(self._rt, self._record, self.dir, self._handle)

    def _settle(self, status: BoxStatus, reason: str, error: str | None = None) -> None:
        """Record a stop/failure; tolerate another process having recorded it first."""
        rt = self._rt
        fields: dict[str, Any] = {"pid": None, "stopped_at": time.time()}
        if status is BoxStatus.FAILED:
            fields["error"] = error or reason
            fields["failures"] = self._record.failures + 1
        try:
            record = rt.store.set_status(self.id, status, state={"stop_reason": reason}, **fields)
        except StateError:
            self.refresh()
            return
        except NotFoundError:
            return
        self._record = record
        if status is BoxStatus.FAILED:
            rt.db.bump("boxes_failed")
            rt.plugins.notify("failed", box=record.to_dict(), error=fields["error"], stage=None)
        else:
            rt.db.bump("boxes_stopped")
            rt.plugins.notify("stopped", box=record.to_dict(), reason=reason)

    # -- attach / connection ---------------------------------------------------------------

    def _attach_handle(self) -> VmHandle | None:
        record = self._record
        if not record.backend:
            return None
        try:
            backend = self._rt.plugins.backend(record.backend)
            return backend.attach(self.dir)
        except Exception as exc:
            log.warning("box %s: attach failed: %s", self.name, exc)
            return None

    def _connect(self, handle: VmHandle, timeout: float) -> Any:
        from ..channel.client import AgentClient

        record = self._record
        agent = dict(record.state.get("agent") or {})
        kind = agent.get("kind") or "virtio-serial"
        box_dir = self.dir
        return AgentClient.connect(
            box_dir,
            kind=kind,
            socket_path=Path(agent["socket"]) if agent.get("socket") else None,
            timeout=timeout,
            is_alive=handle.is_running,
            console_tail=lambda: console_tail(box_dir),
        )

    def _live_client(self) -> Any:
        """The agent connection of a Running box, attaching to it if another process started
        it. A box whose VM is gone is settled and reported as GuestError."""
        with self._lock:
            record = self.refresh()
            if record.status is not BoxStatus.RUNNING:
                hint = f"start it first (`boxlite start {self.name}`)"
                if record.status is BoxStatus.FAILED and record.error:
                    hint = f"it failed: {record.error}; {hint}"
                raise StateError(f"box {self.name} is {record.status.value}; {hint}")
            if self._client is not None and self._handle is not None:
                return self._client
            handle = self._handle or self._attach_handle()
            if handle is None or not handle.is_running():
                self._handle = handle
                raise self._vm_gone("while detached")
            self._handle = handle
            self._sharer_name = record.state.get("sharer")
            try:
                self._client = self._connect(handle, timeout=min(ATTACH_TIMEOUT, boot_timeout()))
            except Exception as exc:
                if not handle.is_running():
                    raise self._vm_gone("while attaching") from exc
                raise
            return self._client

    def _vm_gone(self, during: str) -> GuestError:
        """Settle the record of a VM that died and build the error the caller sees."""
        handle = self._handle
        reason = None
        if handle is not None:
            with contextlib.suppress(Exception):
                reason = handle.exit_reason()
        reason = reason or "the VM process is gone"
        tail = console_tail(self.dir, lines=10)
        clean = is_clean_exit(reason)
        self.teardown_host_side()
        self._settle(
            BoxStatus.STOPPED if clean else BoxStatus.FAILED,
            f"VM stopped {during}: {reason}",
        )
        message = f"box {self.name}: VM stopped {during} ({reason})"
        if tail:
            message += f"\n--- guest console (last lines) ---\n{tail}"
        return GuestError(message)

    def _gone_error(self) -> BoxGoneError | None:
        """After a command died of SIGKILL or lost its stream: was the box stopped or removed
        underneath it? Then the error naming that, else None (a plain kill or crash).

        A stop writes Stopping before it asks the guest to shut down, so a record still
        Running means nobody stopped it. Stopping/Stopped may be followed by a removal under
        the same per-box lock: wait (bounded by SETTLE_WAIT) for the lock, then look again.
        """
        deadline = time.monotonic() + SETTLE_WAIT
        while True:
            try:
                record = self._rt.store.get(self.id)
            except NotFoundError:
                return BoxGoneError(
                    f"box {self.name} was removed while the command ran (boxlite rm -f); "
                    "the command was killed"
                )
            if record.status not in (BoxStatus.STOPPING, BoxStatus.STOPPED):
                return None
            if record.status is BoxStatus.STOPPED and not self._lock_busy():
                try:  # the lock is free: a removal that followed the stop is over too
                    record = self._rt.store.get(self.id)
                except NotFoundError:
                    continue
                if record.state.get("stop_reason") not in ON_REQUEST:
                    return None  # it went down by itself (e.g. poweroff): not a stop
                return BoxGoneError(
                    f"box {self.name} was stopped while the command ran (boxlite stop); "
                    "the command was killed"
                )
            if time.monotonic() >= deadline:
                return BoxGoneError(
                    f"box {self.name} was stopped while the command ran; the command was killed"
                )
            time.sleep(0.1)

    def _lock_busy(self) -> bool:
        """Does another stop/start/remove hold this box's lock (any thread or process)?"""
        try:
            fd = os.open(self._rt.lock_path(self.id), os.O_RDONLY)
        except FileNotFoundError:
            return False  # removed (remove unlinks it) or never locked
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock too
        return False

    def _exec_failed(self, exc: BaseException) -> BaseException:
        """Turn an exec error into what the caller should see, counting it."""
        self._count("exec_errors")
        gone_error = self._gone_error()
        if gone_error is not None:
            return gone_error
        handle = self._handle
        if handle is not None:
            gone = False
            with contextlib.suppress(Exception):
                gone = handle.wait(2.0)  # the VM may take a moment to be reaped
            if gone:
                with self._lock:
                    return self._vm_gone("during exec")
        if isinstance(exc, BoxliteError):
            return exc
        return GuestError(f"box {self.name}: exec failed: {type(exc).__name__}: {exc}")

    def _count(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self._rt.db.bump(key)
            self._rt.store.bump_state_counter(self.id, key)

    # -- exec ------------------------------------------------------------------------------

    def image_config(self) -> ImageConfig:
        cfg = self._record.state.get("image_config")
        if cfg:
            return ImageConfig.from_dict(cfg)
        return self._rt.images.get(self._record.image).config

    def default_command(self) -> list[str]:
        """The image's Entrypoint + Cmd: what `boxlite run IMAGE` runs without a command."""
        cfg = self.image_config()
        argv = [*cfg.entrypoint, *cfg.cmd]
        if not argv:
            raise ConfigError(
                f"image {self._record.image} has no Entrypoint or Cmd; give a command "
                "(boxlite run IMAGE -- CMD...)"
            )
        return argv

    def exec_params(
        self, env: Mapping[str, str] | None, cwd: str | None, user: str | None
    ) -> dict[str, Any]:
        """Image config, then box options, then this call: later wins."""
        cfg = self.image_config()
        options = self._record.options
        merged = {"PATH": DEFAULT_PATH, **cfg.env_dict(), **options.env, **(env or {})}
        return {
            "env": merged,
            "cwd": cwd or options.workdir or cfg.working_dir or "/",
            "user": user or options.user or cfg.user or "",
        }

    @staticmethod
    def _check_args(args: Sequence[str]) -> list[str]:
        if isinstance(args, str) or not args:
            raise ConfigError("exec: give the command as a non-empty list, e.g. ['ls', '-l']")
        return [str(a) for a in args]

    def exec(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        input: bytes | None = None,
    ) -> ExecResult:
        """Run a command to completion and capture its output.

        ``timeout``: seconds (> 0, finite) before the command is killed (then ``timed_out``).
        Raises ConfigError (bad args or timeout), StateError (box not running), BoxGoneError
        (the box was stopped or removed while the command ran), GuestError (the VM died).
        """
        argv = self._check_args(args)
        check_timeout("timeout", timeout)
        client = self._live_client()
        params = self.exec_params(env, cwd, user)
        self._count("execs")
        try:
            code, sig, timed_out, out, err = client.run(
                argv, input=input, timeout=timeout, **params
            )
        except Exception as exc:
            raise self._exec_failed(exc) from exc
        if sig == signal.SIGKILL and not timed_out:
            gone = self._gone_error()
            if gone is not None:
                raise gone
        return ExecResult(code, out, err, sig, timed_out)

    def exec_stream(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> Execution:
        """Start a command and return at once; read ``events()``, then ``wait()``.

        ``timeout`` as for :meth:`exec` (ConfigError unless > 0 and finite).
        """
        argv = self._check_args(args)
        check_timeout("timeout", timeout)
        client = self._live_client()
        params = self.exec_params(env, cwd, user)
        self._count("execs")
        try:
            session = client.exec(argv, timeout=timeout, stdin=stdin, **params)
        except Exception as exc:
            raise self._exec_failed(exc) from exc
        return Execution(self, session, argv)

    # -- files -----------------------------------------------------------------------------

    def _guest_is_dir(self, client: Any, path: str) -> bool | None:
        try:
            return _probe_is_dir(client.probe([path]), path)
        except Exception as exc:
            raise self._exec_failed(exc) from exc

    def copy_in(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a host file, directory or symlink into the box (like `cp -a`): into
        ``guest_path`` if it is a directory (or ends in '/'), else to that name. A host
        symlink is copied as the link (dangling ones too), never its target."""
        src = Path(host_path)
        if not os.path.lexists(src):
            raise ConfigError(f"copy: host path {src} does not exist")
        if not guest_path.startswith("/"):
            raise ConfigError(f"copy: guest path {guest_path!r} must be absolute")
        client = self._live_client()
        if guest_path.endswith("/") or self._guest_is_dir(client, guest_path.rstrip("/") or "/"):
            target_dir, arcname = guest_path.rstrip("/") or "/", src.name
        else:
            target_dir = os.path.dirname(guest_path) or "/"
            arcname = os.path.basename(guest_path)
        with tempfile.SpooledTemporaryFile(max_size=8 * CHUNK) as spool:
            with tarfile.open(fileobj=spool, mode="w") as tar:
                tar.add(str(src), arcname=arcname, recursive=True)
            spool.seek(0)

            def chunks() -> Iterator[bytes]:
                while True:
                    data = spool.read(CHUNK)
                    if not data:
                        return
                    yield data

            try:
                client.upload_tar(target_dir, chunks())
            except Exception as exc:
                raise self._exec_failed(exc) from exc

    def copy_out(self, guest_path: str, host_path: str | os.PathLike[str]) -> Path:
        """Copy a file, directory or symlink out of the box like `docker cp`; returns the host
        path written.

        ``guest_path``: absolute; ``/dir/.`` copies the directory's contents; a symlink is
        copied as a link (``/link/`` follows it). ``host_path``: an existing directory gets
        the copy inside it (named from ``guest_path``), a missing path becomes the copy.
        The guest's tar stream is hostile input: it is unpacked by boxlite_core.transfer into
        a private directory under the runtime home (fd-relative, no link ever followed,
        device nodes refused, setuid/setgid bits dropped from files with a
        SpecialBitsStripped warning), then placed without following any symlink at or
        under ``host_path``. Raises ConfigError (bad paths), GuestError (refused archive,
        agent or VM failure), DiskSpaceError (it would not fit); a refused copy leaves
        nothing at ``host_path`` (type conflicts are checked before anything moves; only a
        merge into an existing directory stopped half-way keeps the entries moved so far).
        """
        from ..diskspace import DiskSpaceError
        from ..transfer import parse_guest_path, receive_tree, staging_root
        from ..transfer.copy_out import check_destination

        request = parse_guest_path(guest_path)
        check_destination(host_path)
        client = self._live_client()
        try:
            result = receive_tree(client.download_tar(request.guest_path), request, host_path,
                                  staging=staging_root(self._rt.home))
        except (ConfigError, DiskSpaceError):
            raise
        except GuestError as exc:  # a refused archive, or the agent/VM failing mid-copy
            gone = False
            with contextlib.suppress(Exception):
                gone = self._handle is not None and bool(self._handle.wait(0.5))
            if gone:
                raise self._exec_failed(exc) from exc
            raise GuestError(f"box {self.name}: copy-out of {guest_path}: {exc}") from exc
        except Exception as exc:
            raise self._exec_failed(exc) from exc
        return result.path

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Box:
        if self.status is not BoxStatus.RUNNING or self._client is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            if self._record.options.auto_remove:
                with contextlib.suppress(NotFoundError):
                    self.remove(force=True)


__all__ = ["Box", "BoxGoneError", "Execution", "is_clean_exit"]
