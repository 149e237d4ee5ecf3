"""tty execs against the real agent (native, chrooted into busybox): the pty is the
program's terminal, sizes and resizes reach it, keys become signals, bytes arrive intact."""

from __future__ import annotations

import hashlib
import re
import signal
import time

import pytest

from boxlite_core.errors import GuestError


def _read_until(session, expected: bytes, timeout: float = 20.0) -> bytes:
    """The terminal's output until ``expected`` shows (tests drive the bare ExecSession)."""
    seen = bytearray()
    deadline = time.monotonic() + timeout
    events = session.events()
    while expected not in seen:
        assert time.monotonic() < deadline, f"{expected!r} not seen; got {bytes(seen)!r}"
        _stream, data = next(events)
        seen.extend(data)
    return bytes(seen)


def test_the_program_runs_on_a_terminal_of_the_containers_devpts(client):
    code, sig, _t, out, err = client.run(
        ["sh", "-c", "tty; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-ttys; "
                     "echo to-stderr >&2; echo TERM=$TERM"],
        tty=True, env={"TERM": "screen-256color"})
    assert (code, sig) == (0, None)
    assert err == b""  # a terminal merges stderr into the one stream
    lines = out.decode().split("\r\n")  # the pty's output processing: \n → \r\n
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    assert "all-ttys" in lines and "to-stderr" in lines and "TERM=screen-256color" in lines


def test_the_terminal_is_the_sessions_controlling_terminal(client):
    # /dev/tty opens only for a process with a controlling terminal; the program leads its
    # own session, so job control (^C, ^Z to the foreground group) works
    code, _s, _t, out, _e = client.run(["sh", "-c", "echo via-dev-tty > /dev/tty"], tty=True)
    assert code == 0 and b"via-dev-tty" in out


@pytest.mark.parametrize(("size", "shown"), [((40, 132), b"40 132"), (None, b"24 80"),
                                            ((5, 1000), b"5 1000")])
def test_window_size_at_start(client, size, shown):
    code, _s, _t, out, _e = client.run(["stty", "size"], tty=True, size=size)
    assert code == 0 and out.strip() == shown


def test_resize_reaches_the_program_as_sigwinch(client):
    session = client.exec(
        ["sh", "-c", "trap 'echo winch $(stty size)' WINCH; echo ready; "
                     "while :; do sleep 0.1; done"],
        tty=True, stdin=True, size=(24, 80))
    _read_until(session, b"ready")
    session.resize(50, 160)
    _read_until(session, b"winch 50 160")
    session.kill(signal.SIGKILL)
    assert session.wait(20).signal == signal.SIGKILL


def test_ctrl_c_interrupts_the_foreground_job_not_the_shell(client):
    session = client.exec(["sh", "-i"], tty=True, stdin=True, env={"PS1": "PROMPT> "})
    _read_until(session, b"PROMPT> ")
    session.write_stdin(b"sleep 100\r")
    time.sleep(0.5)
    session.write_stdin(b"\x03")  # ^C, as a raw terminal sends it
    _read_until(session, b"PROMPT> ")
    session.write_stdin(b"echo still-$((40+2))\r")
    _read_until(session, b"still-42")
    session.write_stdin(b"exit 3\r")
    assert session.wait(20).exit_code == 3


def test_a_megabyte_through_the_terminal_arrives_intact(client):
    # raw output (stty -opost): the bytes as written, none translated or lost at exit
    code, _s, _t, out, _e = client.run(
        ["sh", "-c", "head -c 1048576 /dev/urandom > /tmp/blob; stty -opost; "
                     "sha256sum /tmp/blob > /tmp/sum; cat /tmp/blob"],
        tty=True)
    assert code == 0 and len(out) == 1048576
    want = client.run(["cat", "/tmp/sum"])[3].split()[0].decode()
    assert hashlib.sha256(out).hexdigest() == want


def test_typed_input_reaches_the_program(client):
    session = client.exec(["sh", "-c", "stty -echo; read line; echo got:$line"],
                          tty=True, stdin=True)
    time.sleep(0.5)
    session.write_stdin(b"hello\r")
    assert b"got:hello" in _read_until(session, b"got:hello")
    assert session.wait(20).exit_code == 0


def test_a_signal_death_is_reported_as_such(client):
    code, sig, _t, _o, _e = client.run(["sh", "-c", "kill -TERM $$"], tty=True)
    assert (code, sig) == (None, signal.SIGTERM)


def test_non_root_user_owns_its_terminal(client):
    code, _s, _t, out, _e = client.run(["sh", "-c", "stat -c %u $(tty)"], tty=True,
                                       user="65534")
    assert code == 0 and out.strip() == b"65534"


def test_resize_without_a_terminal_is_refused(client):
    session = client.exec(["sleep", "5"])
    with pytest.raises(GuestError, match="no terminal"):
        session.resize(30, 100)
    session.kill(signal.SIGKILL)
    session.wait(20)
