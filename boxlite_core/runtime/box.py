"""Box: one micro-VM and the container inside it, as the user drives it.

A Box object is a view on a record plus, in the process that started or attached it, the live
VM handle and agent connection (its :class:`~boxlite_core.runtime.link.BoxLink`). Another
process gets its own Box for the same record and re-attaches (backend.attach + a fresh agent
connection), so boxes outlive the program that made them.

This module is the facade: the transitions live in lifecycle.py, commands and files in
boxexec.py, the live state in link.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypedDict, overload

from ..errors import BoxliteError, ConfigError, EngineError, GuestError, NotFoundError
from ..images.model import ImageConfig
from ..models import BoxOptions, BoxStatus, ExecResult, JsonValue, check_timeout
from ..vmm import consolelog
from . import boxexec, lifecycle
from .boxexec import BoxGoneError, ExecParams, Execution
from .link import BoxLink, is_clean_exit
from .pipeline import CONSOLE_LOG
from .records import BoxRecord
from .services import ProgressFn, Services
from .terminal import Terminal

if TYPE_CHECKING:  # imported when first used: gRPC is slow to import
    from ..channel.client import AgentClient
    from .snapshots import Snapshot


class BoxMetrics(TypedDict):
    """:meth:`Box.metrics`: seconds per init stage, and counts since the box was created."""

    stage_timings: dict[str, float]
    execs: int
    exec_errors: int
    boots: int
    failures: int


class Box:
    """Use through :class:`~boxlite_core.runtime.runtime.Runtime` (``create`` / ``get``).

    ``services``: the runtime's :class:`~boxlite_core.runtime.services.Services`.
    """

    def __init__(self, services: Services, record: BoxRecord) -> None:
        self._link = BoxLink(services, record)
        self.id = record.id
        self.name = record.name

    def __repr__(self) -> str:
        return f"<Box {self.name} {self.id} {self._link.record.status.value}>"

    # -- record ----------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        """The box directory: disks, sockets, console log, launch plan."""
        return self._link.dir

    def refresh(self) -> BoxRecord:
        """Re-read the record. NotFoundError once the box is removed."""
        return self._link.refresh()

    @property
    def record(self) -> BoxRecord:
        return self.refresh()

    @property
    def status(self) -> BoxStatus:
        return self.refresh().status

    def info(self) -> dict[str, JsonValue]:
        """The record as JSON (what ``boxlite inspect`` prints), plus the box directory,
        stage timings, the stage (while Starting: where it is; after a failure: where) and
        whether a Starting box's starter is gone."""
        record = self.refresh()
        data = record.to_dict()
        data["dir"] = str(self.dir)
        data["stage_timings"] = dict(record.stage_timings)
        data["stage"] = record.stage
        data["abandoned"] = record.abandoned
        return data

    def metrics(self) -> BoxMetrics:
        record = self.refresh()
        counters = record.state.get("counters")
        counts = dict(counters) if isinstance(counters, Mapping) else {}
        return {
            "stage_timings": dict(record.stage_timings),
            "execs": int(counts.get("execs", 0)),
            "exec_errors": int(counts.get("exec_errors", 0)),
            "boots": int(record.state.get("boots", 0)),
            "failures": record.failures,
        }

    def logs(self, tail: int | None = None, follow: bool = False) -> str | Iterator[str]:
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
        """No more console output will come: the box has no VM, or its VM is gone."""
        link = self._link
        if self.status not in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            return True
        try:
            if link.handle is None:
                link.handle = link.attach_handle()  # once: polled every 0.2 s while idle
            return link.handle is None or not link.handle.is_running()
        except (GuestError, EngineError):  # its host is unreachable: nothing more to show
            return True

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise start/stop/remove of this box across threads and processes (flock)."""
        with self._link.exclusive():
            yield

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, progress: ProgressFn | None = None) -> Box:
        """Boot the box (Configured, Stopped or Failed → Starting → Running). Restart keeps
        its data.

        The record says Starting, naming this process, before anything is spawned, and the
        VMM's pid + start time right after launch, so a process killed mid-start leaves a
        record any later process can clean up (see cleanup.settle_abandoned). A box another
        live process is starting is waited for (the per-box lock), then re-attached.

        Raises StateError (stopping; paused; a live starter that does not hold the lock),
        ConfigError (backend unavailable) and whatever the failing stage raised, prefixed
        with the box and the stage; the record is then Failed.
        """
        lifecycle.start(self._link, progress)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the guest down cleanly (agent sync + power-off), then stop the VM. Idempotent;
        a paused box is resumed first so its guest can sync.

        ``timeout``: seconds (>= 0) for each of the clean shutdown and the forced stop;
        ConfigError if negative or NaN.
        """
        lifecycle.stop(self._link, timeout)

    def kill(self) -> None:
        """Stop the VM at once (no guest shutdown: unsynced writes may be lost)."""
        lifecycle.kill(self._link)

    def pause(self) -> None:
        """Freeze the VM's vCPUs (backends declaring PAUSE): Running → Paused. Commands sent
        to a paused box are refused (StateError naming `boxlite resume`); ones already
        running wait. Pausing a paused box does nothing.

        Raises UnsupportedError (a ConfigError: the backend cannot pause), StateError (not
        running, or its VM is gone)."""
        lifecycle.pause(self._link)

    def resume(self) -> None:
        """Let a paused VM run again: Paused → Running. Resuming a running box does nothing.

        Raises UnsupportedError (the backend cannot pause), StateError (not paused, or its VM is
        gone)."""
        lifecycle.resume(self._link)

    def snapshot(self, name: str) -> Snapshot:
        """Save this running (or paused) box's memory and disks as snapshot ``name``; the
        box goes on as it was (paused for the save: ~1 s for 512 MiB here). A box created
        with ``BoxOptions(snapshot=name)`` continues from it, processes included.

        Raises UnsupportedError (backend without SNAPSHOT, or a box with volumes: not
        captured), StateError (not running), ConfigError (name taken or invalid),
        EngineError (the VMM failed; the box runs on)."""
        return lifecycle.snapshot(self._link, name)

    def fork(self, n: int = 1, *, name: str | None = None) -> list[Box]:
        """``n`` running copies of this box, memory included: snapshot + create + start.
        The source runs on; each copy writes its own disk (no one sees another's writes)
        and gets its own RNG state, clock and hostname. ``name``: the copy's name (n == 1)
        or the prefix of ``NAME-1``… (n > 1); default generated. The snapshot taken is
        listed by ``boxlite snapshot ls`` (auto) and stays while a box uses its disks.

        Raises what :meth:`snapshot`, ``Runtime.create`` and :meth:`start` raise; copies
        that started before a failure keep running (the error names them)."""
        from .creation import create_box

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"fork n={n!r}: must be a whole number >= 1")
        # a snapshot name holds 63 characters, a box name as many: keep the suffix whole
        snap = lifecycle.snapshot(self._link, f"{self.name[:45]}-fork-{secrets.token_hex(3)}",
                                  auto=True)
        copies: list[Box] = []
        for index in range(1, n + 1):
            copy_name = name if n == 1 else (f"{name}-{index}" if name else None)
            try:
                record = create_box(self._link.services,
                                    BoxOptions(snapshot=snap.name, name=copy_name))
                copies.append(Box(self._link.services, record).start())
            except BoxliteError as exc:
                made = ", ".join(c.name for c in copies) or "none"
                exc.add_note(f"fork of {self.name}: copy {index} of {n} failed; copies "
                             f"running: {made}; snapshot: {snap.name}")
                raise
        return copies

    def remove(self, force: bool = False) -> None:
        """Delete the box: VM (running, paused or stopping: only with ``force``), files,
        record. StateError without ``force`` for a box with a VM."""
        lifecycle.remove(self._link, force=force)

    def detach(self) -> None:
        """Forget the live connection in this process; the VM keeps running."""
        self._link.detach()

    def teardown_host_side(self) -> None:
        """Close the agent, release the handle, stop the agent shim and sharer helpers (from
        any process), then any session leader still naming the box directory."""
        self._link.teardown_host_side()

    def _live_client(self) -> AgentClient:
        """The agent connection of a Running box (attached on demand). StateError if not
        running or paused; GuestError if its VM is gone."""
        return self._link.live_client()

    # -- exec ------------------------------------------------------------------------------

    def image_config(self) -> ImageConfig:
        return boxexec.image_config(self._link)

    def default_command(self) -> list[str]:
        """What `boxlite run IMAGE [-- ARGS]` runs: the image's Entrypoint + Cmd, with
        ``BoxOptions.entrypoint`` replacing the Entrypoint (and dropping the image's Cmd) and
        ``BoxOptions.cmd`` replacing the Cmd: docker's rule (runtime/entrypoint.py). Read
        from the record, so it is the same after a restart.

        Raises:
            ConfigError: nothing to run (no Entrypoint or Cmd, or a cleared Entrypoint and
                no ``cmd``)."""
        return boxexec.default_command(self._link)

    def exec_params(
        self, env: Mapping[str, str] | None, cwd: str | None, user: str | None
    ) -> ExecParams:
        """Image config, then box options, then this call: later wins."""
        return boxexec.exec_params(self._link, env, cwd, user)

    @overload
    def exec(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, timeout: float | None = None,
             input: bytes | None = None, tty: Literal[False] = False,
             size: None = None) -> ExecResult: ...

    @overload
    def exec(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, timeout: float | None = None,
             input: None = None, tty: Literal[True],
             size: tuple[int, int] | None = None) -> Terminal: ...

    def exec(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        input: bytes | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> ExecResult | Terminal:
        """Run a command to completion and capture its output; with ``tty=True``, start it on
        a pseudo-terminal of ``size`` (rows, cols; default 24 x 80) and return the
        :class:`Terminal` session at once (``write``, ``read``, ``resize``, ``wait``).

        ``timeout``: seconds (> 0, finite) before the command is killed (then ``timed_out``).
        ``TERM`` is ``xterm`` in a terminal unless the image, the box or ``env`` sets it.
        ``cwd`` (else the box's ``workdir``, else the image's WorkingDir, else /): absolute;
        created when missing, the last directory made the command's user's (GuestError when
        it is a file). Raises ConfigError (bad args, timeout or size; ``input`` with ``tty``;
        a relative ``cwd``), StateError
        (box not running; paused: names `boxlite resume`), BoxGoneError (the box was stopped
        or removed while the command ran), GuestError (the VM died).
        """
        argv = boxexec.check_args(args)
        check_timeout("timeout", timeout)
        if tty:
            if input is not None:
                raise ConfigError("exec: input= and tty=True do not mix; write() to the "
                                  "returned terminal instead")
            return Terminal(self.exec_stream(argv, env=env, cwd=cwd, user=user,
                                             timeout=timeout, stdin=True, tty=True,
                                             size=size))
        if size is not None:
            raise ConfigError(f"exec: size={size!r} needs tty=True")
        params = self.exec_params(env, cwd, user)
        client = self._live_client()
        return boxexec.run(self._link, client, argv, params, timeout=timeout, input=input)

    def exec_stream(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> Execution:
        """Start a command and return at once; read ``events()``, then ``wait()``.

        With ``tty``, on a pseudo-terminal of ``size`` (rows, cols): one "stdout" stream,
        ``resize()`` available (see :meth:`exec`). ``timeout`` as for :meth:`exec`
        (ConfigError unless > 0 and finite); the other errors as for :meth:`exec`.
        """
        argv = boxexec.check_args(args)
        check_timeout("timeout", timeout)
        if size is not None:
            if not tty:
                raise ConfigError(f"exec: size={size!r} needs tty=True")
            size = boxexec.check_size(size)
        params = self.exec_params(env, cwd, user)
        client = self._live_client()
        return boxexec.stream(self._link, client, argv, params, timeout=timeout, stdin=stdin,
                              tty=tty, size=size)

    # -- files -----------------------------------------------------------------------------

    def copy_in(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a host file, directory or symlink into the box, by `docker cp`'s rules.

        ``host_path``: a symlink is copied as the link (dangling ones too), never its target;
        ``SRC/`` follows it; ``SRC/.`` (and ``.``) copies a directory's *contents*.
        ``guest_path``: absolute, resolved in the container (its symlinks followed, as
        docker): an existing directory receives SRC inside it (a directory nests, SRC/.
        merges); a missing path becomes the copy (a directory created with SRC's contents,
        or a file); an existing file is replaced by a file. Files belong to the container's
        root user, modes and mtimes kept.

        Raises ConfigError (missing host path, ``FILE/``, relative guest path, and what the
        guest refuses: a missing parent directory, a file to a missing ``DEST/`` ("no such
        directory"), a directory onto a file, a directory replacing a non-directory or the
        reverse at any depth), StateError (not running), GuestError (agent or VM failure).
        """
        from ..transfer.request import parse_host_source

        request = parse_host_source(host_path)
        if not guest_path.startswith("/"):
            raise ConfigError(f"copy: guest path {guest_path!r} must be absolute")
        if "\x00" in guest_path:
            raise ConfigError(f"copy: guest path {guest_path!r} contains a NUL byte")
        boxexec.copy_in(self._link, self._live_client(), request, guest_path)

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
        from ..transfer import parse_guest_path
        from ..transfer.copy_out import check_destination

        request = parse_guest_path(guest_path)
        check_destination(host_path)
        return boxexec.copy_out(self._link, self._live_client(), request, host_path)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Box:
        if self.status is not BoxStatus.RUNNING or self._link.client is None:
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
            if self._link.record.options.auto_remove:
                with contextlib.suppress(NotFoundError):
                    self.remove(force=True)


__all__ = ["Box", "BoxGoneError", "BoxMetrics", "Execution", "is_clean_exit"]
