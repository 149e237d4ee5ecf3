"""Guest-fed console files stay capped, and reading them stays bounded and terminal-safe.

Fast: no VM. The plan tests read QEMU's argv; the writer tests run the real writer program
(``python -I logwriter.py``) against a unix socket served by the test in QEMU's place (the
``double`` in their names); the ``boxlite logs`` tests run the real CLI in a subprocess on a
box record whose console files the test writes itself. The same paths with a real guest
flooding its serial port: tests/vm/test_console_log.py.
"""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_qemu_plan import make_spec, values

from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.vmm import consolelog
from boxlite_qemu.argv import QemuHost
from boxlite_qemu.backend import QemuBackend
from boxlite_testing import runtime_doubles as doubles

HOST = QemuHost(binary="/usr/bin/qemu-system-x86_64", arch="x86_64", accel="tcg", sandbox=True)
MIB = 1024 * 1024
#: OSC 0 (window title), OSC 52 (clipboard write), clear screen, C1 CSI, CR overwrite, bidi
HOSTILE = b"\x1b]0;pwned\x07\x1b]52;c;Y3VybCBldmlsfHNo\x07\x1b[2J\xc2\x9b1m ok\rEVIL \xe2\x80\xae"


def until(predicate, timeout: float = 20.0) -> None:
    """Wait for the writer (another process, on a loaded host) to have done something."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the writer"
        time.sleep(0.02)


def console_files(box: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in consolelog.log_files(box / "console.log")}


# -- plan ----------------------------------------------------------------------------------------


def test_plan_serves_the_console_on_a_socket_not_an_unbounded_file(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, console_log_max_bytes=3 * MIB)
    plan = QemuBackend(HOST).plan(spec)
    chardevs = values(plan.data["argv"], "-chardev")
    assert not any(c.startswith("file,") for c in chardevs), chardevs
    # wait=on: the guest does not run before the writer is connected (no lost boot lines)
    assert f"socket,id=console,path={tmp_path}/console.sock,server=on,wait=on" in chardevs
    assert values(plan.data["argv"], "-serial") == ["chardev:console"]
    assert plan.data["console_socket"] == str(tmp_path / "console.sock")
    assert plan.data["console_log_max_bytes"] == 3 * MIB


def test_console_cap_is_a_box_option_and_refuses_nonsense() -> None:
    assert BoxOptions().console_log_max_mib == 4
    assert BoxOptions(console_log_max_mib=1).to_dict()["console_log_max_mib"] == 1
    for bad in (0, -1, True, 1.5, 10**9):
        with pytest.raises(ConfigError, match="console_log_max_mib"):
            BoxOptions(console_log_max_mib=bad)


def test_console_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    # long enough for console.sock to pass the 107-byte limit, short enough for qmp.sock and
    # agent.port (two bytes shorter) to fit
    deep = tmp_path / ("d" * (107 - len(os.fsencode(tmp_path)) - 1 - 12))
    assert len(os.fsencode(deep / "agent.port")) <= 107 < len(os.fsencode(deep / "console.sock"))
    with pytest.raises(ConfigError, match="console socket path"):
        QemuBackend(HOST).plan(make_spec(deep))


# -- the writer against a stand-in for QEMU's console socket ---------------------------------------


class ConsoleServerDouble:
    """Plays QEMU's ``-chardev socket,server=on``: listens, accepts the writer, sends bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.conn, _ = self.listener.accept()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def _flood(conn: socket.socket, lines: int, width: int = 60) -> None:
    pad = "x" * (width - 22)
    batch = []
    for i in range(1, lines + 1):
        batch.append(f"flood-{i:09d}-{pad}\r\n".encode())
        if len(batch) == 500:
            conn.sendall(b"".join(batch))
            batch.clear()
    conn.sendall(b"".join(batch))


def test_writer_caps_and_rotates_a_flood_double(tmp_path: Path) -> None:
    box = tmp_path
    server = ConsoleServerDouble(box / "console.sock")
    cap = 256 * 1024
    state = consolelog.start_writer(box, box / "console.sock", box / "console.log", cap)
    try:
        conn = server.accept()
        conn.sendall(b"early boot line 1\r\nearly boot line 2\r\n")
        until(lambda: b"line 2" in (box / "console.log").read_bytes())
        # nothing rotated yet: the first lines are all there
        assert (box / "console.log").read_bytes().startswith(b"early boot line 1\r\n")
        _flood(conn, 150_000)  # ~9 MiB
        conn.sendall(b"THE-END\r\n")
        conn.close()  # QEMU exits: the writer drains and goes by itself
        assert consolelog.wait_writer(box, 10), "writer did not exit after its VMM went away"
    finally:
        server.close()
        consolelog.stop_writer(box)
    files = console_files(box)
    assert set(files) == {"console.log", "console.log.1", "console.log.2"}, files
    assert all(size <= cap for size in files.values()), files
    assert sum(files.values()) <= cap * (consolelog.BACKUPS + 1)
    assert consolelog.tail_bytes(box / "console.log", 2) == (
        f"flood-{150_000:09d}-{'x' * 38}\r\nTHE-END\r\n".encode()
    )
    # rotated files continue one another: the newest backup ends where the live file starts
    first_live = (box / "console.log").read_bytes().split(b"\r\n", 1)[0]
    last_backup = (box / "console.log.1").read_bytes().rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    if first_live.startswith(b"flood-") and last_backup.startswith(b"flood-"):
        assert int(first_live[6:15]) == int(last_backup[6:15]) + 1
    assert "the VMM closed its console" in (box / consolelog.WRITER_LOG).read_text()
    assert not consolelog.writer_running(box) and state["pid"] > 0


def test_writer_stop_is_by_identity_and_drains_double(tmp_path: Path) -> None:
    box = tmp_path
    server = ConsoleServerDouble(box / "console.sock")
    consolelog.start_writer(box, box / "console.sock", box / "console.log", MIB)
    try:
        conn = server.accept()
        conn.sendall(b"last words\r\n")
        consolelog.stop_writer(box)  # SIGTERM: what is in the socket is written first
        assert not consolelog.writer_running(box)
        assert (box / "console.log").read_bytes() == b"last words\r\n"
        # a recorded pid that now names another process is never signalled
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (box / consolelog.WRITER_STATE).write_text(
                f'{{"pid": {sleeper.pid}, "start_time": 1, "socket": "x", "out": "y", '
                f'"max_bytes": 1}}'
            )
            consolelog.stop_writer(box)
            assert sleeper.poll() is None, "stop_writer signalled a recycled pid"
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        server.close()


def test_a_dead_writer_is_restarted_and_appends_double(tmp_path: Path) -> None:
    box = tmp_path
    server = ConsoleServerDouble(box / "console.sock")
    first = consolelog.start_writer(box, box / "console.sock", box / "console.log", MIB)
    try:
        server.accept().sendall(b"before\r\n")
        until(lambda: (box / "console.log").read_bytes() == b"before\r\n")
        os.kill(first["pid"], 9)
        consolelog.wait_writer(box, 5)
        assert consolelog.ensure_writer(box) is True
        conn = server.accept()  # the new writer connects to the same socket
        conn.sendall(b"after\r\n")
        until(lambda: b"after" in (box / "console.log").read_bytes())
        assert (box / "console.log").read_bytes() == b"before\r\nafter\r\n"
        assert consolelog.ensure_writer(box) is False  # alive: nothing to do
    finally:
        consolelog.stop_writer(box)
        server.close()


def test_writer_takes_a_connection_made_for_it_double(tmp_path: Path) -> None:
    """The launch path (listeners.py): the host connects to the console socket it bound and
    the writer inherits that connection, so QEMU's wait=on never waits for the writer's
    start-up. Bytes sent before the writer runs are kept; a restart connects by path."""
    box = tmp_path
    server = ConsoleServerDouble(box / "console.sock")
    made = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    made.connect(str(box / "console.sock"))
    conn = server.accept()
    conn.sendall(b"sent before the writer started\r\n")
    first = consolelog.start_writer(box, box / "console.sock", box / "console.log", MIB,
                                    connected=made)
    made.close()  # the caller's copy; the writer holds its own
    try:
        until(lambda: (box / "console.log").exists()
              and b"started" in (box / "console.log").read_bytes())
        conn.sendall(b"and after\r\n")
        until(lambda: b"after" in (box / "console.log").read_bytes())
        os.kill(first["pid"], 9)
        consolelog.wait_writer(box, 5)
        assert consolelog.ensure_writer(box) is True
        server.accept().sendall(b"restarted\r\n")
        until(lambda: b"restarted" in (box / "console.log").read_bytes())
        assert (box / "console.log").read_bytes() == (
            b"sent before the writer started\r\nand after\r\nrestarted\r\n")
    finally:
        consolelog.stop_writer(box)
        server.close()


def test_writer_reads_a_named_pipe_and_a_stderr_pipe_double(tmp_path: Path) -> None:
    """The two other inputs: a FIFO (a VMM that takes a console *path*, as libkrun's
    krun_set_console_output does) and a pipe on stdin (QEMU's stderr, capped as qemu.log)."""
    box = tmp_path
    fifo = box / "console.fifo"
    err_r, err_w = os.pipe()
    try:
        consolelog.start_writer(box, fifo, box / "console.log", 64 * 1024, fifo=True,
                                stdin_fd=err_r, stdin_out=box / "qemu.log")
    finally:
        os.close(err_r)
    assert fifo.is_fifo() and fifo.stat().st_mode & 0o777 == 0o600
    with open(fifo, "wb") as vmm_console, os.fdopen(err_w, "wb") as vmm_stderr:
        for i in range(5000):  # ~0.5 MiB into each, eight times the cap
            vmm_console.write(f"console {i:05d} {'c' * 90}\n".encode())
            vmm_stderr.write(f"qemu: warning {i:05d} {'e' * 90}\n".encode())
        vmm_console.flush()
        vmm_stderr.flush()
    # both ends closed (the VMM exited): the writer finishes and goes by itself
    assert consolelog.wait_writer(box, 10)
    for name in ("console.log", "qemu.log"):
        files = {p.name: p.stat().st_size for p in consolelog.log_files(box / name)}
        assert len(files) == 3 and all(size <= 64 * 1024 for size in files.values()), files
    assert consolelog.tail_bytes(box / "console.log", 1).startswith(b"console 04999 ")
    assert consolelog.tail_bytes(box / "qemu.log", 1).startswith(b"qemu: warning 04999 ")


def test_follow_crosses_rotation_and_stops_double(tmp_path: Path) -> None:
    box = tmp_path
    server = ConsoleServerDouble(box / "console.sock")
    consolelog.start_writer(box, box / "console.sock", box / "console.log", 4096)
    conn = server.accept()
    conn.sendall(b"old-1\r\nold-2\r\n")
    until(lambda: b"old-2" in (box / "console.log").read_bytes())
    done = threading.Event()
    got: list[bytes] = []

    first = threading.Event()

    def reader() -> None:
        for chunk in consolelog.follow(box / "console.log", done.is_set, tail=1, poll=0.05):
            got.append(chunk)
            first.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert first.wait(10), "follow printed no tail"
        for i in range(40):  # ~40 lines of 100 bytes: the 4 KiB file rotates
            conn.sendall(f"new-{i:02d}-{'y' * 90}\r\n".encode())
            time.sleep(0.02)
        until(lambda: b"new-39" in consolelog.tail_bytes(box / "console.log", 1))
        time.sleep(0.2)  # longer than follow's poll: it has seen the end
        done.set()
        thread.join(10)
        assert not thread.is_alive(), "follow did not stop when told the box stopped"
    finally:
        conn.close()
        server.close()
        consolelog.stop_writer(box)
    text = b"".join(got).decode()
    assert text.startswith("old-2\r\n")
    assert [f"new-{i:02d}" for i in range(40)] == [
        line[:6] for line in text.splitlines()[1:]
    ]


# -- reading: bounded, and inert on a terminal ---------------------------------------------


def test_tail_spans_rotated_files_and_handles_odd_input(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    (tmp_path / "console.log.2").write_bytes(b"a1\na2\n")
    (tmp_path / "console.log.1").write_bytes(b"b1\nb2\n")
    log.write_bytes(b"c1\n")
    assert consolelog.tail_bytes(log, 3) == b"b1\nb2\nc1\n"
    assert consolelog.tail_bytes(log, 100) == b"a1\na2\nb1\nb2\nc1\n"
    assert consolelog.tail_bytes(log, 0) == b""
    assert b"".join(consolelog.iter_log(log)) == b"a1\na2\nb1\nb2\nc1\n"
    log.write_bytes(b"no newline at all " * 1000)  # one endless line: cut to the budget
    assert len(consolelog.tail_bytes(log, 5, max_bytes=1000)) == 1000
    assert consolelog.tail_bytes(tmp_path / "missing.log", 5) == b""


def test_neutralise_leaves_nothing_that_drives_a_terminal() -> None:
    text = consolelog.neutralise(HOSTILE + b"\r\nnext\tline\r\n")
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "\r" not in text and "\u202e" not in text
    assert text == (
        "\\x1b]0;pwned\\x07\\x1b]52;c;Y3VybCBldmlsfHNo\\x07\\x1b[2J\\x9b1m ok\\x0dEVIL "
        "\\u202e\nnext\tline\n"
    )
    safe = consolelog.TerminalSafe()  # a sequence or a CR LF split across chunks
    assert safe.feed(b"a\r") + safe.feed(b"\nb\xe2\x80") + safe.feed(b"\xaec") + safe.flush() \
        == "a\nb\\u202ec"


def _boxlite_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "BOXLITE_HOME": str(home)}
    env.pop("BOXLITE_DEBUG", None)
    return env


@pytest.fixture
def logged_box(tmp_path: Path) -> tuple[Path, Path]:
    """A created (never started) box whose console files the test writes: (home, box dir)."""
    layout = doubles.make_oci_layout(tmp_path / "layout", {"bin/x": b"x"}, {"Cmd": ["/bin/x"]})
    rt = doubles.make_runtime(tmp_path)
    rt.images.import_path(layout, name=doubles.TINY)
    box = rt.create(doubles.opts(name="noisy"))
    box.dir.mkdir(parents=True, exist_ok=True)
    box_dir = box.dir
    rt.close()
    return tmp_path / "home", box_dir


MAX_RSS = """
import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.buffer.write(out.stderr)
print(out.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def _logs_rss_mib(home: Path, *args: str) -> int:
    argv = [sys.executable, "-m", "boxlite_core.cli.main", "logs", *args]
    proc = subprocess.run([sys.executable, "-c", MAX_RSS, *argv], env=_boxlite_env(home),
                          capture_output=True, text=True, timeout=300)
    code, rss = proc.stdout.split()
    assert code == "0", proc.stderr
    return int(rss)


def test_logs_tail_of_a_100_mib_log_uses_bounded_memory(logged_box) -> None:
    home, box_dir = logged_box
    log = box_dir / "console.log"
    log.write_bytes(b"tiny\r\n")
    baseline = _logs_rss_mib(home, "noisy")  # an interpreter with the CLI loaded
    line = b"%09d " + b"z" * 90 + b"\r\n"
    block = b"".join(line % i for i in range(10_000))  # ~1 MiB
    with open(log, "wb") as fh:
        for _ in range(105):
            fh.write(block)
        fh.write(b"one\r\ntwo\r\nthree\r\nfour\r\nfive\r\n")
    assert log.stat().st_size > 100 * MIB
    tail = subprocess.run([sys.executable, "-m", "boxlite_core.cli.main", "logs", "-n", "5",
                           "noisy"], env=_boxlite_env(home), capture_output=True, timeout=120)
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout == b"one\r\ntwo\r\nthree\r\nfour\r\nfive\r\n"
    # reading the whole file streams it too: memory stays a few blocks, not 100 MiB
    for args in (("-n", "5", "noisy"), ("noisy",)):
        rss = _logs_rss_mib(home, *args)
        assert rss < baseline + 16, f"logs {args}: max RSS {rss} MiB (baseline {baseline})"


def _on_a_tty(home: Path, *args: str) -> bytes:
    """Run ``boxlite logs`` with its stdout on a pseudo-terminal; what the terminal got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "boxlite_core.cli.main", "logs", *args],
                            stdout=slave, stderr=subprocess.PIPE, env=_boxlite_env(home))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    return out


def test_logs_on_a_terminal_shows_escape_sequences_as_text(logged_box) -> None:
    home, box_dir = logged_box
    (box_dir / "console.log").write_bytes(b"boot\r\n" + HOSTILE + b"\r\ndone\r\n")
    shown = _on_a_tty(home, "noisy")
    assert b"\x1b" not in shown and b"\x07" not in shown and b"\xc2\x9b" not in shown
    assert b"\xe2\x80\xae" not in shown
    assert b"\\x1b]0;pwned\\x07" in shown and b"\\u202e" in shown and b"done" in shown
    # --raw on a terminal, and any pipe: the bytes as the guest wrote them
    assert HOSTILE in _on_a_tty(home, "--raw", "noisy")
    piped = subprocess.run([sys.executable, "-m", "boxlite_core.cli.main", "logs", "noisy"],
                           env=_boxlite_env(home), capture_output=True, timeout=60)
    assert piped.stdout == b"boot\r\n" + HOSTILE + b"\r\ndone\r\n"
