"""CleanupGuard: what happens when a box fails to start; and stopping whatever a box
directory names, for starts nobody is left to undo.

Why keep everything but the VM: a failed boot is diagnosed from its console log, its launch
plan and its disks, so the guard stops what is running (VM, sharer helpers) and leaves the
files. The record becomes Failed with the reason and the failing stage — never deleted, so
`boxlite ls -a` / `inspect` show what went wrong, and `start` can retry.

A guard runs only in a process that lives. When the process running a start is killed
(SIGKILL, OOM, host crash of the CLI), nothing undoes it: QEMU, the agent shim and virtiofsd
all run in their own sessions and survive. The record was moved to Starting, naming the starter
(pid + start time), before anything was spawned, so any later process can tell "abandoned" from
"still booting"; :func:`stop_box_processes` then stops what the box directory names — the VM
through its backend handle, the VMM identity in the record, QEMU's pidfile, the shim's and the
sharer's pid + start-time records — and, last, any session leader whose argv still names the
box directory (each helper is started with ``start_new_session``, and the windows between a
spawn and its record being written are exactly what a kill hits).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from types import TracebackType

from ..channel.shimctl import stop_shim
from ..errors import BoxliteError, EngineError, NotFoundError, StateError
from ..models import BoxStatus
from ..vmm.base import VmHandle
from ..vmm.procstat import alive, stat_fields
from ..vmm.procstat import start_time as proc_start_time
from .pipeline import PLAN_FILE, StartContext
from .records import BoxRecord, identity_alive
from .services import Services

log = logging.getLogger(__name__)

#: seconds a leftover process gets after SIGTERM before SIGKILL (QEMU flushes its qcow2)
LEFTOVER_GRACE = 3.0
#: seconds to wait for a process to disappear after SIGKILL
KILL_WAIT = 5.0


# -- processes a box directory names ----------------------------------------------------------


def _argv_names(cmdline: bytes, box_dir: bytes) -> bool:
    """Does one argument equal the box directory or hold a path inside it?"""
    return any(arg == box_dir or box_dir + b"/" in arg for arg in cmdline.split(b"\0"))


def _named_children(cmdline: bytes, root: bytes) -> set[str]:
    """Names of the entries of ``root`` that some argument names (``ROOT/NAME`` followed by
    '/', a non-name character, or the end): the box ids an argv refers to."""
    names: set[str] = set()
    prefix = root + b"/"
    for arg in cmdline.split(b"\0"):
        at = arg.find(prefix)
        while at >= 0:
            rest = arg[at + len(prefix):]
            name = rest.split(b"/", 1)[0]
            name = name.split(b",", 1)[0].split(b":", 1)[0]  # QEMU's "path,opt=..." forms
            if name:
                names.add(os.fsdecode(name))
            at = arg.find(prefix, at + 1)
    return names


def _bound_sockets(root: bytes) -> dict[str, str]:
    """``{"socket:[INODE]": entry}`` for the unix sockets bound under ``root/ENTRY/`` (from
    /proc/net/unix): how a helper that got its listening socket as an inherited fd (virtiofsd
    ``--fd=N``) names its box directory without one argument saying so."""
    found: dict[str, str] = {}
    try:
        lines = Path("/proc/net/unix").read_bytes().splitlines()[1:]
    except OSError:
        return found
    prefix = root + b"/"
    for line in lines:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7].startswith(prefix):
            entry = parts[7][len(prefix):].split(b"/", 1)[0]
            if entry:
                found[f"socket:[{int(parts[6])}]"] = os.fsdecode(entry)
    return found


def _socket_entries(pid: int, sockets: dict[str, str]) -> set[str]:
    names: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return names
    for fd in fds:
        with contextlib.suppress(OSError):
            entry = sockets.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            if entry:
                names.add(entry)
    return names


def session_leaders_naming(root: Path) -> dict[str, list[tuple[int, int]]]:
    """The live session leaders of our uid that name an entry of ``root`` (a box directory
    under the home's ``boxes/``) in their argv, or hold a unix socket bound inside it, as
    ``{entry: [(pid, start_time)]}``; one pass over /proc for every box, with or without a
    record.

    Why session leaders only: everything a box runs (QEMU, the agent shim, virtiofsd, log
    writers) is started in its own session, while a user's ``tail -f BOXDIR/console.log`` is
    not, so a stray reader is never taken for the box's VM. This process and its session are
    skipped.
    """
    needle = os.fsencode(str(Path(root).absolute()))
    sockets = _bound_sockets(needle)
    found: dict[str, list[tuple[int, int]]] = {}
    me, my_session, uid = os.getpid(), os.getsid(0), os.geteuid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        names = _named_children(cmdline, needle) if needle in cmdline else set()
        if not names and not sockets:
            continue
        fields = stat_fields(pid)  # [0] state, [3] session, [19] start time
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
            continue
        session = int(fields[3])
        if session != pid or session == my_session:
            continue
        if sockets:
            names |= _socket_entries(pid, sockets)
        if not names:
            continue
        for name in names:
            found.setdefault(name, []).append((pid, int(fields[19])))
    return found


def leftover_processes(box_dir: Path) -> list[tuple[int, int]]:
    """Session leaders whose argv names ``box_dir`` (see :func:`session_leaders_naming`)."""
    box_dir = Path(box_dir).absolute()
    return session_leaders_naming(box_dir.parent).get(box_dir.name, [])


def _signal_group(pid: int, started: int, sig: int) -> None:
    """Signal the process group a session leader heads (its forked helpers go too)."""
    if not alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(procs: list[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        for pid, _ in procs:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child: reap it, or it stays a zombie
        left = [(pid, st) for pid, st in procs if alive(pid, st)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def stop_leftovers(procs: list[tuple[int, int]], grace: float = LEFTOVER_GRACE) -> list[int]:
    """SIGTERM each ``(pid, start_time)`` (its process group), SIGKILL what is left after
    ``grace`` seconds; returns the pids that were running. A recycled pid is never signalled:
    the start time must still match."""
    live = [(pid, st) for pid, st in procs if alive(pid, st)]
    for pid, st in live:
        _signal_group(pid, st, signal.SIGTERM)
    left = _wait_gone(live, grace)
    for pid, st in left:
        _signal_group(pid, st, signal.SIGKILL)
    still = _wait_gone(left, KILL_WAIT)
    for pid, _ in still:
        log.warning("process %d did not exit after SIGKILL", pid)
    return [pid for pid, _ in live]


def _pidfile_process(box_dir: Path) -> tuple[int, int] | None:
    """The VMM named by the launch plan's pidfile (QEMU writes it before it opens QMP, so it
    covers a kill between spawn and the backend's own state file), if it runs and its argv
    names this box directory (a pidfile alone could name a recycled pid)."""
    try:
        data = json.loads((box_dir / PLAN_FILE).read_text()).get("data") or {}
        pid = int(Path(str(data["pidfile"])).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    started = proc_start_time(pid)
    if started is None or not _argv_names(cmdline, os.fsencode(str(box_dir.absolute()))):
        return None
    return (pid, started)


def kill_vmm(services: Services, record: BoxRecord, box_dir: Path,
             handle: VmHandle | None = None) -> list[str]:
    """Kill the box's VM by every name the box has for it: ``handle`` (this process's),
    the backend's attach (its state file in the box directory), the VMM identity in the
    record, the plan's pidfile. Returns what was found running, for the log."""
    box_dir = Path(box_dir)
    stopped: list[str] = []
    handles: list[VmHandle] = [handle] if handle is not None else []
    if record.backend:
        try:
            attached = services.plugins.backend(record.backend,
                                                      record.options.host).attach(box_dir)
        except Exception as exc:  # a broken state file must not keep a VM alive
            log.warning("box %s: attach failed while stopping it: %s", record.name, exc)
            attached = None
        if attached is not None:
            handles.append(attached)
    for h in handles:
        try:
            if h.is_running():
                stopped.append(f"VM pid {h.pid}")
                h.kill()
                h.wait(KILL_WAIT)
        except Exception as exc:
            log.warning("box %s: could not kill the VM: %s", record.name, exc)
        with contextlib.suppress(Exception):
            h.release()
    named: list[tuple[int, int]] = []
    vmm = record.vmm
    if vmm and vmm.get("pid") and vmm.get("start_time") is not None:
        named.append((int(vmm["pid"]), int(vmm["start_time"])))
    from_pidfile = _pidfile_process(box_dir)
    if from_pidfile is not None:
        named.append(from_pidfile)
    stopped += [f"VMM pid {pid}" for pid in stop_leftovers(sorted(set(named)), grace=0.0)]
    return stopped


def stop_helpers(services: Services, record: BoxRecord, box_dir: Path,
                 sharer_name: str | None = None) -> None:
    """Stop the network relay, the agent shim and the volume sharer's helpers (virtiofsd) from
    their records in the box directory. The sharer in use is in the record before its
    helpers start."""
    box_dir = Path(box_dir)
    from ..network.relayctl import stop_relay

    try:
        stop_relay(box_dir)
    except Exception as exc:
        log.warning("box %s: stopping the network relay failed: %s", record.name, exc)
    try:
        stop_shim(box_dir)
    except Exception as exc:
        log.warning("box %s: stopping the agent shim failed: %s", record.name, exc)
    name = sharer_name or record.state.get("sharer")
    if name:
        try:
            services.plugins.volume_sharer(name).stop(box_dir)
        except Exception as exc:
            log.warning("box %s: stopping sharer %s failed: %s", record.name, name, exc)


def stop_box_processes(services: Services, record: BoxRecord, box_dir: Path,
                       handle: VmHandle | None = None) -> list[str]:
    """Stop everything the box directory names, whatever the record's status: the VM
    (:func:`kill_vmm`), the shim and sharer helpers (:func:`stop_helpers`), then any session
    leader still naming the directory. Returns what was found running. Never raises for a
    process that is already gone; each step is independent."""
    box_dir = Path(box_dir)
    stopped = kill_vmm(services, record, box_dir, handle)
    stop_helpers(services, record, box_dir)
    stopped += [f"leftover pid {pid}" for pid in stop_leftovers(leftover_processes(box_dir))]
    if stopped:
        log.info("box %s: stopped %s", record.name, ", ".join(stopped))
    return stopped


def settle_abandoned(services: Services, record: BoxRecord) -> BoxRecord:
    """A Starting record whose starter is gone: stop what its box directory names, then mark
    it Failed, saying which stage the start died in and which process ran it.

    Call with the box's lock held (Box.exclusive), so no live start can be undone."""
    starter = record.starter or {}
    stage = record.stage or "start"
    stopped = stop_box_processes(services, record, services.box_dir(record.id))
    error = (
        f"{stage}: start abandoned: the process that ran it (pid {starter.get('pid', '?')}) "
        "is gone"
        + (f"; stopped what it left running ({', '.join(stopped)})" if stopped else "")
        + "; `boxlite start` retries"
    )
    try:
        record = services.store.set_status(
            record.id, BoxStatus.FAILED, expect={BoxStatus.STARTING}, error=error,
            failures=record.failures + 1, pid=None, stopped_at=time.time(),
            state={"failed_stage": stage, "stop_reason": "start abandoned"},
        )
    except StateError:  # settled by another process first
        return services.store.get(record.id)
    with contextlib.suppress(Exception):
        services.db.bump("boxes_failed")
    services.plugins.notify("failed", box=record.to_dict(), error=error, stage=stage)
    return record


def starter_is_elsewhere(record: BoxRecord) -> bool:
    """Starting, and the starter is a live process other than this one. (This process holds
    the box lock when it asks, so a start of its own cannot be in flight.)"""
    starter = record.starter or {}
    return (
        record.status is BoxStatus.STARTING
        and identity_alive(starter)
        and int(starter.get("pid") or 0) != os.getpid()
    )


def annotate(exc: BaseException, prefix: str) -> BaseException:
    """Return an error whose message starts with ``prefix``: the same object for our own
    errors (so the class and exit code survive), an EngineError for anything else."""
    if isinstance(exc, BoxliteError):
        message = str(exc)
        if not message.startswith(prefix):
            exc.args = (f"{prefix}{message}",)
        return exc
    return EngineError(f"{prefix}{type(exc).__name__}: {exc}")


class CleanupGuard:
    """Around the pipeline; on an exception it undoes the start and records why."""

    def __init__(self, ctx: StartContext) -> None:
        self.ctx = ctx

    def __enter__(self) -> CleanupGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            return False
        ctx = self.ctx
        stage = ctx.stage or "start"
        self._undo()
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BoxliteError) else str(exc)
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted"
        record = ctx.record
        services = ctx.services
        try:
            record = services.store.set_status(
                record.id,
                BoxStatus.FAILED,
                error=f"{stage}: {reason}",
                failures=record.failures + 1,
                pid=None,
                stopped_at=time.time(),
                state={"failed_stage": stage, "stage_timings": dict(ctx.timings)},
            )
        except (NotFoundError, StateError) as err:  # removed or changed under us: say so
            log.warning("box %s: could not mark failed: %s", record.name, err)
        with contextlib.suppress(Exception):
            services.db.bump("boxes_failed")
        services.plugins.notify("failed", box=record.to_dict(), error=reason, stage=stage)
        if isinstance(exc, Exception):
            new = annotate(exc, f"box {record.name}: start failed in {stage}: ")
            if new is not exc:
                raise new from exc
        return False

    def _undo(self) -> None:
        """Stop the VM and sharers; every step is independent and must not mask the error."""
        ctx = self.ctx
        if ctx.client is not None:
            with contextlib.suppress(Exception):
                ctx.client.close()
        if ctx.handle is not None:
            try:
                ctx.handle.kill()
                ctx.handle.wait(10)
            except Exception as err:
                log.warning("box %s: could not kill the VM: %s", ctx.record.name, err)
            with contextlib.suppress(Exception):
                ctx.handle.release()
        with contextlib.suppress(Exception):
            stop_shim(ctx.box_dir)
        if ctx.sharer is not None:
            try:
                ctx.sharer.stop(ctx.box_dir)
            except Exception as err:
                log.warning("box %s: could not stop the sharer: %s", ctx.record.name, err)
        # whatever a stage spawned before recording it (e.g. a VMM whose launch raised)
        with contextlib.suppress(Exception):
            stop_leftovers(leftover_processes(ctx.box_dir))
