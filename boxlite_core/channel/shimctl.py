"""Start, find and stop a box's agent shim (the process in channel/shim.py).

Why a process: only one host can hold the virtio-serial stream, yet any number of host
processes (``boxlite exec`` in two terminals) talk to one box. The shim holds the port and
serves real gRPC at BOXDIR/agent.grpc.sock (mode 0600); :func:`connect_shim` dials a live one
or starts one under BOXDIR/shim.lock, so racing processes never start two. Closing a client
leaves the shim running; :func:`stop_shim` (the runtime's stop/kill/cleanup) and the VM's
death end it. Its identity (pid + start time) is BOXDIR/shim.json, so a recycled pid is never
taken for it.
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
from typing import IO

from ..errors import GuestError
from ..vmm.procstat import alive, log_tail, terminate
from .port import dead_error, ready_timeout_error
from .target import Transport

SHIM_SOCK_NAME = "agent.grpc.sock"  # what host clients dial (served by the shim)
PRIVATE_BRIDGE_NAME = "agent.bridge.sock"  # the shim's own port relay
#: bound by a standby shim (:func:`warm_shim`) once it is given this box, for its whole life:
#: its argv does not name the box, so this is how cleanup (runtime/cleanup.py, sockets bound
#: inside a box directory) finds it
SHIM_CLAIM_NAME = "shim.claim.sock"
SHIM_JSON = "shim.json"
SHIM_LOCK = "shim.lock"
SHIM_LOG = "shim.log"


class ShimTransport(Transport):
    """A connection to the box's shim: closing it leaves the shim (and the port) alone."""

    def __init__(self, box_dir: Path, pid: int) -> None:
        self.pid = pid
        self.target = f"unix:{Path(box_dir).absolute() / SHIM_SOCK_NAME}"


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


def _popen_shim(options: list[str], *, stdin: int, output: int | IO[bytes]) -> subprocess.Popen:
    env = dict(os.environ)
    root = _package_root()  # the shim must import the same boxlite_core as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "boxlite_core.channel.shim", *options],
        stdin=stdin,
        stdout=output,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # outlives this process; a ^C here must not reach it
        close_fds=True,
    )
    # Reap it whenever it exits, so it never lingers as a zombie of a long-lived host process.
    threading.Thread(target=proc.wait, daemon=True, name=f"shim-reaper-{proc.pid}").start()
    return proc


#: this process's standby shim (:func:`warm_shim`), taken by the next start that needs one
_standby: subprocess.Popen | None = None
_standby_lock = threading.Lock()


def warm_shim() -> None:
    """Start a standby shim now, unless this process has one: a shim process that does
    its interpreter and gRPC start-up (~0.2 s of CPU, ~0.25 s here) while the start goes on,
    then waits on a pipe for the box it will serve. The runtime calls this when a box is
    created and when a start begins; the start hands the standby its box
    (:func:`_spawn_shim`) when it needs a shim, instead of starting one then: that start-up
    lay between a template-restored VM's ``cont`` and its agent's first answer.

    Measured (15 interleaved pairs, API create + start from a template): start 0.676 s
    with a standby started well ahead, 0.752 s without. One started again after every start
    for the next was no better overall: its start-up slowed the first command of the box
    just started as much (this host's 2 cores), so none is kept between starts.

    It holds nothing of any box until assigned; then it binds ``BOXDIR/shim.claim.sock``
    (:data:`SHIM_CLAIM_NAME`) before anything else, so cleanup finds it as the box's. It
    exits when its pipe closes unassigned: this process exiting (however it ends) never
    leaves it behind. Never raises: without it a start spawns a shim as before."""
    global _standby
    with _standby_lock:
        if _standby is not None and _standby.poll() is None:
            return
        try:
            _standby = _popen_shim(["--standby"], stdin=subprocess.PIPE,
                                   output=subprocess.DEVNULL)
        except OSError:
            _standby = None


def _take_standby() -> subprocess.Popen | None:
    global _standby
    with _standby_lock:
        proc, _standby = _standby, None
    return proc if proc is not None and proc.poll() is None else None


def _spawn_shim(
    box_dir: Path, port_path: Path, timeout: float, ready_retry: float | None = None,
    *, standby: bool = True,
) -> subprocess.Popen:
    job = {"box_dir": str(box_dir.absolute()), "port": str(port_path.absolute()),
           "timeout": timeout, "ready_retry": ready_retry}
    ahead = _take_standby() if standby else None
    if ahead is not None and ahead.stdin is not None:
        try:
            ahead.stdin.write(json.dumps(job).encode() + b"\n")
            ahead.stdin.close()
            return ahead
        except OSError:  # it died meanwhile: start one the slow way
            _kill_spawned(ahead)
    with open(box_dir / SHIM_LOG, "ab") as log:
        return _popen_shim(
            ["--box-dir", job["box_dir"], "--port", job["port"], "--timeout", str(timeout),
             *(("--ready-retry", str(ready_retry)) if ready_retry else ())],
            stdin=subprocess.DEVNULL, output=log)


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
    ready_retry: float | None = None,
    standby: bool = True,
) -> ShimTransport:
    """Dial the box's live shim, or start one and wait until it serves (it has seen READY),
    racing the timeout, the VM's death and the shim's own death. ``ready_retry``: see
    ``AgentClient.connect``. ``standby=False``: never the standby (:func:`warm_shim`), a
    shim started now: for a VM restored from a state saved with its host attached (a
    snapshot), whose guest must see the old host go before the new one comes. A standby
    attached within milliseconds of ``cont``, before the CPU-bound restored guest had run:
    it saw no change, kept serving the dead session and sent no READY until the shim's
    2 s re-attach (measured: fork 3.5 s instead of 0.8 s)."""
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
                raise dead_error("before its guest agent became ready", console_tail)
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out waiting for {box_dir / SHIM_LOCK}: another process is starting "
                    "the box's agent shim and has not finished"
                )
            time.sleep(0.02)
        info = live_shim(box_dir)
        if info is not None:
            return ShimTransport(box_dir, int(info["pid"]))
        proc = _spawn_shim(box_dir, port_path, max(1.0, deadline - time.monotonic()),
                           ready_retry, standby=standby)
        try:
            while True:
                info = _read_shim_info(box_dir)
                if info is not None and int(info["pid"]) == proc.pid:
                    return ShimTransport(box_dir, proc.pid)
                if not is_alive():
                    raise dead_error("before its guest agent became ready", console_tail)
                if proc.poll() is not None:
                    raise GuestError(
                        f"the agent shim of {box_dir} exited with status {proc.returncode} "
                        f"before serving; its log ({box_dir / SHIM_LOG}) ends:\n"
                        f"{log_tail(box_dir / SHIM_LOG, 1000, 2000) or '(empty)'}"
                    )
                if time.monotonic() >= deadline:
                    raise ready_timeout_error(port_path, console_tail)
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
        for name in (SHIM_JSON, SHIM_SOCK_NAME, PRIVATE_BRIDGE_NAME, SHIM_CLAIM_NAME):
            with contextlib.suppress(OSError):  # best effort: never fail a stop over a file
                (box_dir / name).unlink()
    return stopped
