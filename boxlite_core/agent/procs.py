"""Running a command inside the container: fork chain, namespaces, output, status.

The chain, per exec (all plain forks of the agent, no helper binaries to exec):

  zygote: unshare(NEWPID), fork B, setns back, report B's pid
  (fallback without zygote: agent ──fork──▶ A: unshare(NEWNS|NEWPID), fork B, exit)
                  B: unshare(NEWNS); PID 1 of the new pid namespace: private mounts, chroot, /proc,
                     resolve the user, fork C, forward signals to C's group, report C's status
                  C: setsid, setgroups/setgid/setuid, chdir, execvpe(args)

Why B exists: the program must not be the namespace's PID 1, or `kill -9 $$` and default
signal dispositions silently stop working (the kernel protects a namespace's init).
unshare(CLONE_NEWPID) only applies to the caller's *children*, hence the zygote's setns back.
When B exits, the kernel kills whatever the program left behind in its namespace, so pipes
close and Output ends.

Status reporting goes through one pipe (fd 3 in A/B), messages tagged by one byte:
  P<pid>  B's pid in the agent's namespace      S  program exec'd
  E<len><text>  setup failed (before S)         X<status>  program's raw wait status
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import threading
import time
import uuid
from collections import deque

from . import libc, rootpath, terminal, users
from .pid1 import Reaper, log

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on timeout
OUTPUT_HIGH_WATER = 2 * 1024 * 1024  # buffered bytes per exec before the reader stops reading
READ_CHUNK = 64 * 1024
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
    signal.SIGALRM,
)
STDOUT, STDERR = 0, 1


class ExecError(Exception):
    """The command could not be started (unknown program, bad user or cwd, ...)."""


class OutputBuffer:
    """stdout/stderr chunks in arrival order, bounded so a slow reader back-pressures the
    program instead of growing the agent's memory; nothing is dropped."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.closed = False
        self.discarding = False

    def discard(self) -> None:
        """Nobody will read this output (a snapshot's copy inherited the session): drop what
        waits and everything that comes, so the program never blocks on it."""
        with self.cond:
            self.discarding = True
            self.items.clear()
            self.size = 0
            self.cond.notify_all()

    def put(self, stream: int, data: bytes) -> None:
        with self.cond:
            if self.discarding:
                return
            while self.size >= OUTPUT_HIGH_WATER and not self.discarding:
                self.cond.wait()
            if self.discarding:
                return
            self.items.append((stream, data))
            self.size += len(data)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def take(self, timeout: float) -> list[tuple[int, bytes]] | None:
        """Pending chunks (possibly []), or None once closed and drained."""
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            if not self.items:
                return None if self.closed else []
            out = list(self.items)
            self.items.clear()
            self.size = 0
            self.cond.notify_all()
            return out


class Process:
    """One exec: its fds, output buffer and final status."""

    def __init__(self, exec_id: str) -> None:
        self.exec_id = exec_id
        self.init_pid = 0  # B, in the agent's pid namespace
        self.stdin_fd: int | None = None
        self.stdin_lock = threading.Lock()
        self.output = OutputBuffer()
        self.done = threading.Event()
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.finished_at = 0.0
        self._timer: threading.Timer | None = None
        self.terminal_fd: int | None = None  # a tty exec's pty master (output side)

    # -- control ---------------------------------------------------------------
    def kill(self, sig: int) -> None:
        if self.done.is_set() or not self.init_pid:
            return
        try:
            # B forwards catchable signals to the program's group; SIGKILL on B tears down
            # the whole namespace at once.
            os.kill(self.init_pid, sig)
        except ProcessLookupError:
            pass

    def _on_timeout(self, grace: float) -> None:
        if self.done.is_set():
            return
        self.timed_out = True
        self.kill(signal.SIGTERM)
        if not self.done.wait(grace):
            self.kill(signal.SIGKILL)

    def write_stdin(self, data: bytes, close: bool) -> None:
        with self.stdin_lock:
            if self.stdin_fd is None:
                if data:
                    raise ExecError(f"exec {self.exec_id}: stdin is closed or was not requested")
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.stdin_fd, view) :]
            except BrokenPipeError:
                close = True  # the program stopped reading; that is its business
            if close:
                os.close(self.stdin_fd)
                self.stdin_fd = None

    def close_stdin(self) -> None:
        self.write_stdin(b"", True)

    def resize(self, rows: int, cols: int) -> None:
        """Set a tty exec's window size. ExecError when it has no terminal (or it closed)."""
        fd = self.terminal_fd
        if fd is None:
            raise ExecError(f"exec {self.exec_id} has no terminal to resize (started without tty)")
        try:
            terminal.set_size(fd, rows, cols)
        except OSError as exc:
            raise ExecError(f"exec {self.exec_id}: resize: {exc.strerror}") from None

    # -- background readers ----------------------------------------------------
    def _finish(self, exit_code: int | None, sig: int | None) -> None:
        self.exit_code, self.signal = exit_code, sig
        self.finished_at = time.monotonic()
        if self._timer:
            self._timer.cancel()
        self.done.set()
        if self.stdin_fd is not None:
            try:
                self.close_stdin()
            except OSError:
                pass

    def _watch_status(self, status_fd: int) -> None:
        """Wait for X<status> from B; EOF without it means B was killed (SIGKILL)."""
        try:
            msg = _read_msg(status_fd)
        finally:
            os.close(status_fd)
        self._status_read(msg)

    def _status_read(self, msg: tuple[str, object] | None) -> None:
        if msg and msg[0] == "X":
            st = msg[1]
            if os.WIFSIGNALED(st):
                self._finish(None, os.WTERMSIG(st))
            else:
                self._finish(os.waitstatus_to_exitcode(st), None)
        else:
            self._finish(None, signal.SIGKILL)

    def _pump_terminal(self, master: int) -> None:
        """A tty exec's output: everything the pty's master reads, as STDOUT. EIO means every
        slave fd closed (the program and whatever it left behind are gone): the end."""
        try:
            while True:
                try:
                    data = os.read(master, READ_CHUNK)
                except InterruptedError:  # pragma: no cover
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        break
                    raise
                if not data:
                    break
                self.output.put(STDOUT, data)
        finally:
            self.terminal_fd = None
            os.close(master)
            self.output.close()

    def _pump_output(self, out_fd: int, err_fd: int, status_fd: int) -> None:
        """stdout and stderr into the buffer until both close, and B's status message (see
        _watch_status) when it comes: one thread per exec, not two (under TCG each thread
        start cost a restored guest's first exec ~10 ms, measured)."""
        fds = {out_fd: STDOUT, err_fd: STDERR}
        poller = select.poll()
        for fd in (*fds, status_fd):
            poller.register(fd, select.POLLIN)
        try:
            while fds or status_fd >= 0:
                for fd, _ev in poller.poll():
                    if fd == status_fd:  # X<status> is one atomic write (< PIPE_BUF)
                        poller.unregister(fd)
                        try:
                            msg = _read_msg(fd)
                        finally:
                            os.close(fd)
                            status_fd = -1
                        self._status_read(msg)
                        continue
                    try:
                        data = os.read(fd, READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if data:
                        self.output.put(fds[fd], data)
                    else:
                        poller.unregister(fd)
                        os.close(fd)
                        del fds[fd]
                        if not fds:
                            self.output.close()  # Output ends now, whether B reported yet
        finally:
            for fd in fds:
                os.close(fd)
            self.output.close()
            if status_fd >= 0:
                os.close(status_fd)
                self._status_read(None)


class Zygote:
    """A small single-threaded fork server, started before gRPC is imported.

    Why: forking the agent itself means copying a large, multi-threaded gRPC process (slow,
    and only safe by care). The zygote is forked early, when the agent is small and has no
    gRPC threads; each exec sends it the child's fds over SCM_RIGHTS and it forks stage B.
    """

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def on_exit(status: int) -> None:
            log(f"exec zygote exited (status {status}); a new one starts on the next exec")

        self._reaper.spawn(lambda: _zygote_main(theirs, ours), on_exit)
        theirs.close()
        self._sock = ours

    def spawn(self, fds: list[int], params: dict) -> None:
        payload = json.dumps(params).encode()
        with self._lock:
            for attempt in (0, 1):
                try:
                    assert self._sock is not None
                    socket.send_fds(self._sock, [payload], fds)
                    if self._sock.recv(16) == b"ok":
                        return
                except OSError:
                    pass
                if attempt == 0:  # the zygote died: start another and retry once
                    if self._sock is not None:
                        self._sock.close()
                    self._start()
        raise ExecError("the agent's exec helper (zygote) is not working")


def _zygote_main(sock: socket.socket, parent_end: socket.socket) -> None:
    parent_end.close()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we go

    def reap(_signum, _frame) -> None:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass

    signal.signal(signal.SIGCHLD, reap)
    # Forking the namespace's init directly saves the intermediate stage-A fork: unshare the
    # pid namespace for the next child only, then setns back to our own.
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        except InterruptedError:  # pragma: no cover
            continue
        if not msg:
            os._exit(0)  # the agent is gone
        params = json.loads(msg)
        pid = -1
        try:
            libc.unshare(libc.CLONE_NEWPID)
            try:
                pid = os.fork()
            finally:
                if pid != 0:
                    libc.setns(own_pidns, libc.CLONE_NEWPID)
        except OSError as exc:
            log(f"exec zygote: {exc}")
        if pid == 0:
            sock.close()
            os.close(own_pidns)
            _stage_b_entry(fds, **params)
        if pid > 0:
            try:
                _send(fds[3], b"P", pid)
            except OSError:
                pass
        for fd in fds:
            os.close(fd)
        sock.send(b"ok" if pid > 0 else b"fail")


class ProcessTable:
    """All execs of this agent, by id."""

    def __init__(self, reaper: Reaper, zygote: Zygote | None = None) -> None:
        self.reaper = reaper
        self.zygote = zygote
        self._lock = threading.Lock()
        self._procs: dict[str, Process] = {}

    def orphan_all(self) -> int:
        """Discard the output of every exec started so far (see OutputBuffer.discard);
        returns how many there were."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.output.discard()
        return len(procs)

    def get(self, exec_id: str) -> Process:
        with self._lock:
            proc = self._procs.get(exec_id)
        if proc is None:
            raise KeyError(f"no exec with id {exec_id!r} (finished long ago, or never started)")
        return proc

    def _prune(self) -> None:
        cutoff = time.monotonic() - 600
        with self._lock:
            for key in [
                k
                for k, p in self._procs.items()
                if p.done.is_set()
                and p.output.closed
                and not p.output.items
                and p.finished_at < cutoff
            ]:
                del self._procs[key]

    def start(
        self,
        root: str,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        user: str,
        timeout: float,
        want_stdin: bool,
        tty: bool = False,
        size: tuple[int, int] = terminal.DEFAULT_SIZE,
    ) -> Process:
        """Start ``args`` in the container at ``root``; returns once it was exec'd.

        With ``tty`` the program runs on a new pty of the container's devpts (window ``size``:
        rows, cols), which is also its stdin, stdout and stderr and its controlling terminal.

        Raises:
            ExecError: no program, or the program could not be started (named).
        """
        if not args:
            raise ExecError("exec needs at least one argument (the program)")
        self._prune()
        proc = Process(uuid.uuid4().hex[:16])
        status_r, status_w = os.pipe()
        if tty:
            try:
                master, slave = terminal.open_pty(root)
                terminal.set_size(master, *size)
            except OSError as exc:
                os.close(status_r)
                os.close(status_w)
                raise ExecError(f"cannot allocate a terminal: {exc.strerror or exc}") from None
            stdin_w = os.dup(master) if want_stdin else -1
            out_r, err_r = master, -1
            fds = [slave, slave, slave, status_w]
        else:
            stdin_r, stdin_w = (os.pipe() if want_stdin
                                else (os.open(os.devnull, os.O_RDONLY), -1))
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            fds = [stdin_r, out_w, err_w, status_w]
        params = {"root": root, "args": args, "env": env, "cwd": cwd or "/", "user": user,
                  "tty": tty}
        try:
            if self.zygote is not None:
                self.zygote.spawn(fds, params)
            else:
                self.reaper.spawn(lambda: _stage_a(fds, **params), lambda _status: None)
        finally:
            for fd in set(fds):
                os.close(fd)
        try:
            msg = _read_msg(status_r)
            if msg and msg[0] == "P":
                proc.init_pid = msg[1]
                msg = _read_msg(status_r)
            if not msg or msg[0] != "S":
                why = msg[1] if msg and msg[0] == "E" else "the exec helper died during setup"
                raise ExecError(why)
        except BaseException:
            for fd in (status_r, out_r, err_r, stdin_w):
                if fd >= 0:
                    os.close(fd)
            raise
        if want_stdin:
            proc.stdin_fd = stdin_w
        if tty:
            proc.terminal_fd = out_r
            pump = threading.Thread(target=proc._pump_terminal, args=(out_r,))
            threading.Thread(
                target=proc._watch_status,
                args=(status_r,),
                daemon=True,
                name=f"status-{proc.exec_id}",
            ).start()
        else:
            pump = threading.Thread(target=proc._pump_output, args=(out_r, err_r, status_r))
        pump.daemon = True
        pump.name = f"out-{proc.exec_id}"
        pump.start()
        if timeout and timeout > 0:
            proc._timer = threading.Timer(timeout, proc._on_timeout, args=(KILL_GRACE,))
            proc._timer.daemon = True
            proc._timer.start()
        with self._lock:
            self._procs[proc.exec_id] = proc
        return proc


# ------------------------------------------------------------------ status pipe protocol


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = os.read(fd, n - len(buf))
        except InterruptedError:  # pragma: no cover
            continue
        if not chunk:
            return buf
        buf += chunk
    return buf


def _read_msg(fd: int) -> tuple[str, object] | None:
    tag = _read_exact(fd, 1)
    if not tag:
        return None
    if tag in (b"P", b"X"):
        raw = _read_exact(fd, 4)
        return (tag.decode(), struct.unpack("=i", raw)[0]) if len(raw) == 4 else None
    if tag == b"S":
        return ("S", None)
    if tag == b"E":
        raw = _read_exact(fd, 4)
        if len(raw) != 4:
            return None
        return ("E", _read_exact(fd, struct.unpack("=I", raw)[0]).decode(errors="replace"))
    return None


def _send(fd: int, tag: bytes, value: int | str | None = None) -> None:
    if isinstance(value, int):
        payload = tag + struct.pack("=i", value)
    elif isinstance(value, str):
        raw = value.encode()[:4000]
        payload = tag + struct.pack("=I", len(raw)) + raw
    else:
        payload = tag
    os.write(fd, payload)  # < PIPE_BUF: atomic


# ------------------------------------------------------------------ forked stages
# Everything below runs in forked children of a multi-threaded process: no locks, no logging,
# no imports, no printing; only os.* / ctypes calls, errors go to the status pipe.

STATUS_FD = 3


def _arrange_fds(fds: list[int]) -> None:
    """stdin, stdout, stderr, status → fds 0..3; everything else closed."""
    # High temporaries first so dup2 onto 0..3 cannot clobber a source fd.
    tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]
    for target, fd in enumerate(tmp):
        os.dup2(fd, target)
    os.closerange(4, 1 << 20)
    os.set_inheritable(STATUS_FD, False)
    for sig in (*FORWARDED_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _stage_a(fds: list[int], root: str, args, env, cwd, user, tty=False) -> None:
    """Fallback path without the zygote: unshare here, fork the namespace's init."""
    try:
        _arrange_fds(fds)
        libc.unshare(libc.CLONE_NEWNS | libc.CLONE_NEWPID)
        pid = os.fork()
    except BaseException as exc:
        _send(STATUS_FD, b"E", f"exec setup failed: {exc}")
        os._exit(127)
    if pid:
        _send(STATUS_FD, b"P", pid)
        os._exit(0)
    _stage_b(root, args, env, cwd, user, tty)


def _stage_b_entry(fds: list[int], root: str, args, env, cwd, user, tty=False) -> None:
    """Zygote path: already PID 1 of a new pid namespace; take a private mount namespace."""
    try:
        _arrange_fds(fds)
        # If the agent (and so the zygote) dies, take the whole namespace down with it.
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.unshare(libc.CLONE_NEWNS)
    except BaseException as exc:
        _send(STATUS_FD, b"E", f"exec setup failed: {exc}")
        os._exit(127)
    _stage_b(root, args, env, cwd, user, tty)


def _stage_b(root: str, args, env, cwd, user, tty=False) -> None:
    child = 0
    try:
        libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
        os.chroot(root)
        os.chdir("/")
        try:
            os.mkdir("/proc", 0o555)
        except FileExistsError:
            pass
        libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        ident = users.resolve(user)
        _make_working_directory(cwd, ident)
        env = dict(env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", ident.home)
        err_r, err_w = os.pipe()

        def forward(signum, _frame):
            if child:
                try:
                    os.killpg(child, signum)
                except OSError:
                    pass

        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        child = os.fork()
        if child == 0:
            os.close(err_r)
            _stage_c(err_w, args, env, cwd, ident, tty)
        os.close(err_w)
        problem = b""
        while chunk := os.read(err_r, 4096):
            problem += chunk
        os.close(err_r)
    except ExecError as exc:  # said for the user already
        _send(STATUS_FD, b"E", str(exc))
        os._exit(127)
    except BaseException as exc:
        _send(STATUS_FD, b"E", f"exec setup failed: {exc}")
        os._exit(127)
    if problem:
        _send(STATUS_FD, b"E", problem.decode(errors="replace"))
        os._exit(127)
    _send(STATUS_FD, b"S")
    for fd in (0, 1, 2):
        os.close(fd)  # only the program holds the pipes now: EOF when it (and kin) finish
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            _send(STATUS_FD, b"X", status)
            os._exit(0)


def _make_working_directory(cwd: str, ident: users.Identity) -> None:
    """Create a missing working directory in the (chrooted) container before the program
    runs there, as runc (``MkdirAll(cwd, 0755)`` in prepareRootfs) and docker
    (``SetupWorkingDirectory``) do: components resolved inside the root (rootpath), missing
    ones made 0755. The last one created is given to the exec's user, as podman does
    (``resolveWorkDir``), so a non-root user can write where it was put; runc and docker leave
    it root's. An existing directory is left as it is.

    Raises:
        ExecError: the path meets a file, a link cycle, or cannot be created (read-only
            root), naming the path.
    """
    try:
        _real, created = rootpath.resolve("/", cwd or "/", create=True)
    except OSError as exc:
        raise ExecError(f"working directory {cwd!r}: {rootpath.describe(exc, cwd)}") from None
    if created:
        os.chown(created[-1], ident.uid, ident.gid)


def _stage_c(err_w: int, args, env, cwd, ident, tty=False) -> None:
    try:
        os.setsid()
        if tty:
            # fds 0-2 are the pty's slave: make it this new session's controlling terminal
            # (so ^C reaches the foreground job) and the user's, as login(1) and runc do
            terminal.make_controlling(0)
            os.fchown(0, ident.uid, -1)
        for sig in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setgroups(ident.groups)
        os.setgid(ident.gid)
        os.setuid(ident.uid)
    except BaseException as exc:
        os.write(err_w, f"exec setup failed (user): {exc}".encode())
        os._exit(127)
    try:
        os.chdir(cwd)
    except OSError as exc:
        os.write(err_w, f"working directory {cwd!r}: {exc.strerror}".encode())
        os._exit(127)
    try:
        os.execvpe(args[0], args, env)
    except OSError as exc:
        reason = "not found in PATH" if exc.errno == errno.ENOENT else exc.strerror
        os.write(err_w, f"cannot run {args[0]!r}: {reason}".encode())
    except BaseException as exc:
        os.write(err_w, f"cannot run {args[0]!r}: {exc}".encode())
    os._exit(127)


__all__ = ["ExecError", "Process", "ProcessTable", "log"]
