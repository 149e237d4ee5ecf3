"""Guest-fed log files on the host: the capped writer's life, and reading a log safely.

The guest is root and hostile, and everything it writes to its serial console lands in a host
file. Two dangers, two halves of this module:

* **Size.** :func:`start_writer` runs :mod:`.logwriter` (a stdlib-only program) for a box: it
  connects to the console socket the VMM serves and keeps ``console.log`` under a byte cap,
  rotating to ``console.log.1`` .. ``console.log.N``. It is its own process in its own session
  (outlives ``boxlite run -d``), recorded in ``BOXDIR/logwriter.json`` by pid + start time so
  any later process can stop it (:func:`stop_writer`) without ever signalling a recycled pid,
  or restart it if it died (:func:`ensure_writer`).
* **Content.** The files hold the guest's raw bytes. Reading is bounded (:func:`tail_bytes`
  reads backwards in blocks, never the whole file; :func:`follow` polls and follows rotation),
  and :class:`TerminalSafe` turns bytes into text that cannot drive a terminal (escape
  sequences, carriage returns, backspaces and bidi overrides become visible ``\\xNN`` text).
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, EngineError
from ..models import JsonObject
from .procstat import alive, log_tail, start_time, terminate

#: the console socket the VMM serves and the writer connects to
CONSOLE_SOCKET = "console.sock"
#: the named pipe a VMM that only takes a console *path* writes into (libkrun), drained by
#: the writer's ``--fifo`` input
CONSOLE_FIFO = "console.fifo"
#: pid + start time + parameters of a box's running writer
WRITER_STATE = "logwriter.json"
#: serialises restarts of a dead writer between processes
WRITER_LOCK = "logwriter.lock"
#: the writer's own few lines (why it exited); bounded: it prints at most three lines
WRITER_LOG = "logwriter.log"
#: default cap of each console file, MiB (BoxOptions.console_log_max_mib)
DEFAULT_MAX_MIB = 4
#: rotated files kept besides the live one: at most (BACKUPS + 1) * cap on disk
BACKUPS = 2
#: cap of each file of a host daemon's log (virtiofsd-TAG.log): its diagnostics, not the
#: guest's console, so one fixed size for every box (~2 500 device resets of history)
DAEMON_LOG_MAX_BYTES = 1024 * 1024
#: seconds the writer waits for the VMM's console socket before it gives up
CONNECT_TIMEOUT = 120.0
#: seconds stop_writer waits after SIGTERM (the writer drains, then exits) before SIGKILL
STOP_GRACE = 3.0
#: block size when reading a log backwards
READ_BLOCK = 64 * 1024
#: the most bytes a tail read looks at, whatever the number of lines asked (lines that long
#: are a hostile guest's, and memory must stay bounded)
MAX_TAIL_BYTES = 4 * 1024 * 1024

_WRITER = str(Path(__file__).with_name("logwriter.py"))
_ROTATED = re.compile(r"\.(\d+)$")


# -- the writer process ------------------------------------------------------------------------


def _read_state(box_dir: Path) -> JsonObject | None:
    try:
        data = json.loads((Path(box_dir) / WRITER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def _write_state(box_dir: Path, data: JsonObject) -> None:
    path = Path(box_dir) / WRITER_STATE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def writer_argv(source: Path, out: Path, max_bytes: int, backups: int = BACKUPS,
                append: bool = False, fifo: bool = False,
                stdin_out: Path | None = None, connected_fd: int | None = None) -> list[str]:
    """The writer's command line: a fresh isolated interpreter (``-I``) running the file."""
    argv = [sys.executable, "-I", _WRITER, "--fifo" if fifo else "--connect", str(source),
            "--out", str(out), "--max-bytes", str(int(max_bytes)), "--backups", str(int(backups)),
            "--connect-timeout", str(CONNECT_TIMEOUT)]
    if connected_fd is not None:
        argv += ["--connected-fd", str(connected_fd)]
    if stdin_out is not None:
        argv += ["--stdin-out", str(stdin_out)]
    return [*argv, "--append"] if append else argv


def start_writer(box_dir: Path, source: Path, out: Path, max_bytes: int,
                 backups: int = BACKUPS, append: bool = False, *, fifo: bool = False,
                 stdin_fd: int | None = None, stdin_out: Path | None = None,
                 connected: socket.socket | None = None) -> JsonObject:
    """Start the capped writer for ``out`` (fresh files unless ``append``), before the VMM.

    ``source`` is the console socket the VMM will serve (the writer connects once it
    listens) or, with ``fifo``, a named pipe the VMM will write (created here if missing).
    ``connected``: a connection to ``source`` the caller already made (it bound the socket
    for the VMM itself), which the writer inherits instead of connecting; the caller closes
    its copy. A restarted writer (:func:`ensure_writer`) connects to ``source`` again.
    ``stdin_fd``/``stdin_out``: the read end of a pipe whose write end becomes the VMM's
    stderr, copied to ``stdin_out`` under the same cap (the caller closes its copy of the fd).
    Returns the state record (pid, start_time, ...) also written to ``BOXDIR/logwriter.json``.
    Raises ConfigError for a cap of 0 or less, EngineError when the writer cannot start."""
    if max_bytes <= 0:
        raise ConfigError(f"console log cap {max_bytes} bytes: must be > 0")
    box_dir = Path(box_dir)
    if fifo:
        try:
            if not Path(source).is_fifo():
                Path(source).unlink(missing_ok=True)
                os.mkfifo(source, 0o600)
        except OSError as exc:
            raise EngineError(f"could not create the console pipe {source}: {exc}") from exc
    argv = writer_argv(source, out, max_bytes, backups, append, fifo,
                       stdin_out if stdin_fd is not None else None,
                       connected.fileno() if connected is not None else None)
    try:
        with open(box_dir / WRITER_LOG, "ab" if append else "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives us, never gets our terminal's ^C
                umask=0o077, close_fds=True,
                pass_fds=(connected.fileno(),) if connected is not None else (),
            )
    except OSError as exc:
        raise EngineError(f"could not start the console log writer ({argv[0]}): {exc}") from exc
    # reap it whenever it exits, so it never lingers as a zombie of a long-lived host process
    threading.Thread(target=proc.wait, daemon=True, name=f"logwriter-reaper-{proc.pid}").start()
    state = {
        "pid": proc.pid,
        "start_time": start_time(proc.pid),
        "socket": str(source),
        "fifo": fifo,
        "out": str(out),
        "max_bytes": int(max_bytes),
        "backups": int(backups),
    }
    _write_state(box_dir, state)
    return state


def start_pipe_writer(out: Path, max_bytes: int = DAEMON_LOG_MAX_BYTES,
                      backups: int = BACKUPS) -> tuple[int, JsonObject]:
    """Start a capped writer for a host daemon's output: ``(write_fd, record)``.

    Give ``write_fd`` to the daemon as its stdout/stderr, then close it. The writer copies
    the pipe into ``out`` (fresh), rotating to ``out.1`` .. ``out.N`` before any file passes
    ``max_bytes``, and exits by itself once every copy of the write end is closed (the
    daemon exited, whatever killed it), so it needs no stop of its own; its argv names
    ``out``, so the box's leftover-process sweep finds it too. ``record`` has its pid and
    start time. Why: virtiofsd logs a few lines per device reset, which a guest root can
    repeat ~2 500 times a second (notes/console-log.md). Raises ConfigError for a cap of 0
    or less, EngineError when the writer cannot start."""
    if max_bytes <= 0:
        raise ConfigError(f"log cap {max_bytes} bytes for {out}: must be > 0")
    argv = [sys.executable, "-I", _WRITER, "--stdin", "--out", str(out),
            "--max-bytes", str(int(max_bytes)), "--backups", str(int(backups))]
    # the log exists when this returns: the writer opens it a few ms later (much later on a
    # loaded host), and a caller pointing the user at the log must never name a missing file
    try:
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise EngineError(f"could not create the log {out}: {exc}") from exc
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            argv, stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, umask=0o077, close_fds=True,
        )
    except OSError as exc:
        os.close(write_fd)
        raise EngineError(f"could not start the log writer for {out} ({argv[0]}): {exc}") from exc
    finally:
        os.close(read_fd)
    threading.Thread(target=proc.wait, daemon=True, name=f"logwriter-reaper-{proc.pid}").start()
    return write_fd, {"pid": proc.pid, "start_time": start_time(proc.pid), "out": str(out)}


def wait_gone(record: JsonObject, timeout: float) -> bool:
    """Wait until the process of a ``{"pid", "start_time"}`` record has exited (a pipe
    writer drains its last bytes first). True if it is gone."""
    deadline = time.monotonic() + timeout
    while alive(int(record["pid"]), record.get("start_time")):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def writer_running(box_dir: Path) -> bool:
    """Is this box's recorded writer alive (same pid *and* start time)?"""
    state = _read_state(box_dir)
    return state is not None and alive(int(state["pid"]), state.get("start_time"))


def ensure_writer(box_dir: Path) -> bool:
    """Restart a box's writer that died (the VMM still serves the socket; the new writer
    appends). True if one was started. Call only while the VM runs. Two processes attaching
    at once start one writer between them (flock on BOXDIR/logwriter.lock)."""
    with open(Path(box_dir) / WRITER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _read_state(box_dir)
        if state is None or alive(int(state["pid"]), state.get("start_time")):
            return False
        # the VMM's stderr pipe died with the old writer: only the console is picked up again
        start_writer(Path(box_dir), Path(state["socket"]), Path(state["out"]),
                     int(state["max_bytes"]), int(state.get("backups", BACKUPS)), append=True,
                     fifo=bool(state.get("fifo")))
    return True


def stop_writer(box_dir: Path, grace: float = STOP_GRACE) -> None:
    """Stop a box's writer (SIGTERM: it drains and exits; SIGKILL after ``grace`` s) and drop
    its state. Safe from any process, any number of times; a recycled pid is never signalled."""
    box_dir = Path(box_dir)
    state = _read_state(box_dir)
    if state is not None:
        terminate(int(state["pid"]), state.get("start_time"), grace)
    (box_dir / WRITER_STATE).unlink(missing_ok=True)


def wait_writer(box_dir: Path, timeout: float = 2.0) -> bool:
    """Wait until the box's writer has exited (after its VMM did, it drains and goes), so
    the console files are complete. True if it is gone."""
    state = _read_state(box_dir)
    return state is None or wait_gone(state, timeout)


def writer_tail(box_dir: Path) -> str:
    """The writer's own last lines (why it exited), for error messages."""
    return log_tail(Path(box_dir) / WRITER_LOG, 5)


# -- reading ----------------------------------------------------------------------------------


def log_files(path: Path) -> list[Path]:
    """``path`` and its rotated copies, newest first. Smaller suffix = newer, for our writer
    (``.1``, ``.2``) and libvirt's virtlogd (``.0``, ``.1``, ...) alike."""
    path = Path(path)
    rotated: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if entry.name.startswith(path.name + "."):
                match = _ROTATED.search(entry.name[len(path.name):])
                if match and entry.name == f"{path.name}.{match.group(1)}":
                    rotated.append((int(match.group(1)), entry))
    files = [path] if path.exists() else []
    return files + [p for _, p in sorted(rotated)]


def _tail_of(fh: BinaryIO, end: int, want: int, budget: int) -> tuple[list[bytes], int, int]:
    """Blocks read backwards from ``end`` until ``want`` newlines were passed or ``budget``
    bytes read: (blocks in file order, newlines seen, bytes read)."""
    blocks: list[bytes] = []
    seen = used = 0
    pos = end
    while pos > 0 and used < budget and seen < want:
        size = min(READ_BLOCK, pos, budget - used)
        pos -= size
        fh.seek(pos)
        block = fh.read(size)
        blocks.insert(0, block)
        used += len(block)
        seen += block.count(b"\n")
    return blocks, seen, used


def tail_bytes(path: Path, lines: int, max_bytes: int = MAX_TAIL_BYTES,
               current: tuple[BinaryIO, int] | None = None) -> bytes:
    """The last ``lines`` lines of a (rotated) log, reading at most ``max_bytes`` from the
    end, going on into ``path.1`` etc. when the live file holds fewer lines. Memory: at most
    ``max_bytes`` (plus one block), whatever the file size; lines longer than that come out
    cut to their end. ``current``: (open binary handle of ``path``, offset) to read the live
    file up to that offset only (:func:`follow` continues from there)."""
    if lines <= 0:
        return b""
    want = lines + 1  # the newline before the first wanted line, and maybe a trailing one
    collected: list[bytes] = []
    seen = used = 0
    files = log_files(path)
    if current is not None and (not files or files[0] != Path(path)):
        files.insert(0, Path(path))
    for index, file in enumerate(files):
        if seen >= want or used >= max_bytes:
            break
        if index == 0 and current is not None:
            blocks, n, read = _tail_of(current[0], current[1], want - seen, max_bytes - used)
        else:
            try:
                fh = open(file, "rb")  # noqa: SIM115 - closed below
            except OSError:
                continue
            with fh:
                size = os.fstat(fh.fileno()).st_size
                blocks, n, read = _tail_of(fh, size, want - seen, max_bytes - used)
        collected[:0] = blocks
        seen += n
        used += read
    data = b"".join(collected)
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]


def iter_log(path: Path, block: int = READ_BLOCK) -> Iterator[bytes]:
    """Every byte of a (rotated) log, oldest file first, in blocks: memory stays one block."""
    for file in reversed(log_files(path)):
        try:
            fh = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        with fh:
            while chunk := fh.read(block):
                yield chunk


def follow(path: Path, should_stop: Callable[[], bool], tail: int | None = None,
           poll: float = 0.2, block: int = READ_BLOCK) -> Iterator[bytes]:
    """The last ``tail`` lines (everything when None), then new bytes as they are written,
    across rotations, until ``should_stop()`` says so (checked when idle; a last drain
    follows). Polls: no inotify dependency; new lines show within ``poll`` seconds.

    Under a flood that rotates the log more than once per ``poll`` interval, the rotated
    copies in between are skipped (they stay on disk until rotated away)."""
    path = Path(path)
    fh = None
    while fh is None:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed in finally
        except FileNotFoundError:
            if should_stop():
                return
            time.sleep(poll)
    try:
        if tail is None:
            end = os.fstat(fh.fileno()).st_size
            for file in reversed(log_files(path)[1:]):
                with contextlib.suppress(OSError), open(file, "rb") as old:
                    while chunk := old.read(block):
                        yield chunk
            fh.seek(0)
            while fh.tell() < end and (chunk := fh.read(min(block, end - fh.tell()))):
                yield chunk
        else:
            end = os.fstat(fh.fileno()).st_size
            data = tail_bytes(path, tail, current=(fh, end))
            if data:
                yield data
            fh.seek(end)
        stopping = False
        while True:
            chunk = fh.read(block)
            if chunk:
                yield chunk
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                rotated = False  # between the rename and the new file: look again soon
            if rotated:
                try:
                    new = open(path, "rb")  # noqa: SIM115 - closed in finally
                except FileNotFoundError:  # rotated again in between: look again soon
                    time.sleep(poll)
                    continue
                fh.close()
                fh = new
                continue
            if stopping:
                return
            if should_stop():
                stopping = True  # one more pass: what was written just before the end
                time.sleep(poll)
                continue
            time.sleep(poll)
    finally:
        fh.close()


# -- showing guest bytes on a terminal --------------------------------------------------------

#: candidates: everything but printable ASCII, LF and TAB (fast path: most logs are ASCII)
_SUSPECT = re.compile("[^\x20-\x7e\n\t]")


def _escape(match: re.Match[str]) -> str:
    """What ``str.isprintable`` refuses (C0, DEL,
    C1, bidi and other format characters, line/paragraph separators) becomes an escape."""
    ch = match.group(0)
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TerminalSafe:
    """Guest bytes → text that only prints: decoded as UTF-8 (invalid bytes become U+FFFD),
    CR LF → LF, and every other control character shown as ``\\xNN`` (``\\uNNNN`` for bidi
    overrides), so ESC never reaches the terminal and cannot move the cursor, retitle the
    window, set the clipboard (OSC 52) or hide earlier lines. Stateful across chunks: a
    multi-byte character or a CR LF split between two chunks comes out whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cr = False

    def feed(self, data: bytes) -> str:
        text = self._decoder.decode(data)
        if self._cr:
            text = "\r" + text
            self._cr = False
        if text.endswith("\r"):
            text = text[:-1]
            self._cr = True
        return _SUSPECT.sub(_escape, text.replace("\r\n", "\n"))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True) + ("\r" if self._cr else "")
        self._cr = False
        return _SUSPECT.sub(_escape, text.replace("\r\n", "\n"))


def inert(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses but LF and TAB written as an
    escape (``\\x1b``, ``\\u202e``): guest-chosen text that is safe to print."""
    return _SUSPECT.sub(_escape, text)


def neutralise(data: bytes) -> str:
    """One-shot :class:`TerminalSafe`."""
    safe = TerminalSafe()
    return safe.feed(data) + safe.flush()
