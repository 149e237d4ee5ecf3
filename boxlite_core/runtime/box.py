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
import shutil
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
from ..guest.transport import stop_shim
from ..images.model import ImageConfig
from ..models import BoxStatus, Capability, ExecResult, ExitStatus
from .cleanup import CleanupGuard
from .pipeline import CONSOLE_LOG, ProgressFn, StartContext, boot_timeout, console_tail, run_stages
from .records import BoxRecord

if TYPE_CHECKING:
    from ..vmm.base import VmHandle
    from .runtime import Runtime

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 1024 * 1024
#: seconds a re-attach waits for the agent of an already running VM
ATTACH_TIMEOUT = 30.0


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
        try:
            status = self.session.wait(timeout)
        except Exception as exc:
            raise self._wrap(exc) from exc
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

    def logs(self) -> str:
        """The guest serial console of the current (or last) boot."""
        try:
            return (self.dir / CONSOLE_LOG).read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        """Boot the box (Configured, Stopped or Failed → Running). Restart keeps its data."""
        rt = self._rt
        with self.exclusive():
            record = self.refresh()
            if record.status is BoxStatus.RUNNING:
                self._live_client()  # re-attach (or find it dead and say so)
                return self
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
                    },
                )
            self._record = record
            self._handle, self._client, self._sharer_name = ctx.handle, ctx.client, ctx.sharer_name
        rt.db.bump("boxes_started")
        rt.plugins.notify("started", box=record.to_dict(), stage_timings=dict(ctx.timings))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the guest down cleanly (agent sync + power-off), then stop the VM. Idempotent."""
        rt = self._rt
        with self.exclusive():
            record = self.refresh()
            if record.status in (BoxStatus.CONFIGURED, BoxStatus.STOPPED):
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
            if record.status in (BoxStatus.CONFIGURED, BoxStatus.STOPPED):
                return
            self._kill_vm()
            self.teardown_host_side()
            if record.status is not BoxStatus.FAILED:
                self._settle(BoxStatus.STOPPED, "killed on request")

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
        any process)."""
        self.detach()
        try:
            stop_shim(self.dir)
        except Exception as exc:
            log.warning("box %s: stopping the agent shim failed: %s", self.name, exc)
        name = self._sharer_name or self._record.state.get("sharer")
        if name:
            try:
                self._rt.plugins.volume_sharer(name).stop(self.dir)
            except Exception as exc:
                log.warning("box %s: stopping sharer %s failed: %s", self.name, name, exc)
        self._sharer_name = None

    def _kill_vm(self) -> None:
        handle = self._handle or self._attach_handle()
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.kill()
                handle.wait(10)

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
        from ..guest.client import AgentClient

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

    def _exec_failed(self, exc: BaseException) -> BaseException:
        """Turn an exec error into what the caller should see, counting it."""
        self._count("exec_errors")
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
        """Run a command to completion and capture its output."""
        argv = self._check_args(args)
        client = self._live_client()
        params = self.exec_params(env, cwd, user)
        self._count("execs")
        try:
            code, sig, timed_out, out, err = client.run(
                argv, input=input, timeout=timeout, **params
            )
        except Exception as exc:
            raise self._exec_failed(exc) from exc
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
        """Start a command and return at once; read ``events()``, then ``wait()``."""
        argv = self._check_args(args)
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
        """Copy a host file or directory into the box (like `cp -r`): into ``guest_path`` if
        it is a directory (or ends in '/'), else to that name."""
        src = Path(host_path)
        if not src.exists():
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
        """Copy a file or directory out of the box; returns the host path written.

        The tar is extracted with tarfile's "data" filter into a temporary directory next to
        the destination, then renamed into place: a hostile guest cannot write outside the
        destination (absolute names, '..', links, devices are refused) and a failed copy
        leaves nothing half-written.
        """
        if not guest_path.startswith("/"):
            raise ConfigError(f"copy: guest path {guest_path!r} must be absolute")
        dest = Path(host_path)
        parent = dest if dest.is_dir() else dest.parent
        if not parent.is_dir():
            raise ConfigError(f"copy: host directory {parent} does not exist")
        client = self._live_client()
        with tempfile.TemporaryDirectory(dir=parent, prefix=".boxlite-cp-") as tmp:
            tar_path = Path(tmp) / "data.tar"
            try:
                with tar_path.open("wb") as fh:
                    for chunk in client.download_tar(guest_path):
                        fh.write(chunk)
            except Exception as exc:
                raise self._exec_failed(exc) from exc
            out = Path(tmp) / "out"
            out.mkdir()
            try:
                with tarfile.open(tar_path) as tar:
                    tar.extractall(out, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise GuestError(f"box {self.name}: bad archive for {guest_path}: {exc}") from exc
            items = list(out.iterdir())
            if len(items) != 1:
                raise GuestError(
                    f"box {self.name}: expected one entry for {guest_path}, got {len(items)}"
                )
            item = items[0]
            final = dest / item.name if dest.is_dir() else dest
            if final.is_dir() and item.is_dir():
                shutil.copytree(item, final, dirs_exist_ok=True, symlinks=True)
            elif final.is_dir():
                raise ConfigError(f"copy: {final} is a directory; {guest_path} is a file")
            else:
                os.replace(item, final)
            return final

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


__all__ = ["Box", "Execution", "is_clean_exit"]
