"""Exec semantics against the real agent, chrooted into a busybox rootfs."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from boxlite_core.errors import GuestError


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(client, code):
    assert client.run(["sh", "-c", f"exit {code}"])[:3] == (code, None, False)


def test_killed_by_own_signal(client):
    # The program is not its namespace's PID 1, so SIGKILL to itself works.
    exit_code, sig, timed_out, _, _ = client.run(["sh", "-c", "kill -9 $$"])
    assert (exit_code, sig, timed_out) == (None, 9, False)


def test_stdout_and_stderr_are_separate(client):
    code, _, _, out, err = client.run(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert code == 0
    assert out == b"out\nout2\n"
    assert err == b"err\n"


def test_output_arrives_as_it_happens(client):
    session = client.exec(["sh", "-c", "echo first; sleep 2; echo second"])
    start = time.monotonic()
    events = session.events()
    assert next(events) == ("stdout", b"first\n")
    assert time.monotonic() - start < 1.5
    assert list(events) == [("stdout", b"second\n")]
    assert session.wait().exit_code == 0


def test_ten_megabytes_of_output_intact(client):
    code, _, _, out, err = client.run(
        ["sh", "-c", "head -c 10000000 /dev/urandom | tee /tmp/blob; sha256sum /tmp/blob >&2"]
    )
    assert code == 0
    assert len(out) == 10_000_000
    assert hashlib.sha256(out).hexdigest() == err.split()[0].decode()


def test_stdin_is_piped(client):
    data = os.urandom(3_000_000)
    code, _, _, out, _ = client.run(["sha256sum"], input=data)
    assert code == 0
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_interactive_stdin_session(client):
    session = client.exec(["sh", "-c", "read line; echo got:$line; cat"], stdin=True)
    session.write_stdin(b"hello\n")
    events = session.events()
    assert next(events) == ("stdout", b"got:hello\n")
    session.write_stdin(b"more")
    session.close_stdin()
    assert b"".join(d for _, d in events) == b"more"
    assert session.wait().exit_code == 0


def test_no_stdin_means_dev_null(client):
    assert client.run(["cat"])[:4] == (0, None, False, b"")


def test_env_cwd_and_defaults(client):
    code, _, _, out, _ = client.run(
        ["sh", "-c", "echo $FOO; pwd; echo $PATH; echo $HOME"], env={"FOO": "bar baz"}, cwd="/etc"
    )
    lines = out.decode().splitlines()
    assert code == 0
    assert lines[0] == "bar baz"
    assert lines[1] == "/etc"
    assert "/bin" in lines[2].split(":")
    assert lines[3] == "/root"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", "0 0"),
        ("app", "1000 1000"),
        ("1000", "1000 1000"),
        ("1234:5678", "1234 5678"),
        ("app:extra", "1000 2000"),
    ],
)
def test_user(client, user, expected):
    code, _, _, out, _ = client.run(["sh", "-c", "echo $(id -u) $(id -g)"], user=user)
    assert (code, out.decode().strip()) == (0, expected)


def test_supplementary_groups_from_container_group_file(client):
    out = client.run(["id", "-G"], user="app")[3].decode().split()
    assert sorted(out) == ["1000", "2000"]


def test_unknown_user_program_and_cwd_are_errors(client):
    with pytest.raises(GuestError, match="nosuchuser"):
        client.exec(["true"], user="nosuchuser")
    with pytest.raises(GuestError, match="not found in PATH"):
        client.exec(["no-such-program"])
    with pytest.raises(GuestError, match="working directory '/etc/passwd': exists and is not a d"):
        client.exec(["true"], cwd="/etc/passwd")  # a missing one is created: test_exec_paths


def test_timeout_kills(client):
    start = time.monotonic()
    exit_code, sig, timed_out, _, _ = client.run(["sleep", "30"], timeout=0.5)
    assert timed_out is True
    assert sig == 15
    assert exit_code is None
    assert time.monotonic() - start < 5


def test_timeout_escalates_to_sigkill(client):
    start = time.monotonic()
    _, sig, timed_out, _, _ = client.run(["sh", "-c", "trap '' TERM; sleep 30"], timeout=0.3)
    assert (sig, timed_out) == (9, True)
    assert time.monotonic() - start < 6


def test_kill(client):
    session = client.exec(["sleep", "30"])
    session.kill(9)
    status = session.wait(timeout=10)
    assert (status.exit_code, status.signal, status.timed_out) == (None, 9, False)
    session = client.exec(["sleep", "30"])
    session.kill(2)
    assert session.wait(timeout=10).signal == 2


def test_wait_timeout_raises_timeout_error(client):
    session = client.exec(["sleep", "30"])
    with pytest.raises(TimeoutError):
        session.wait(timeout=0.3)
    session.kill(9)
    assert session.wait(timeout=10).signal == 9


def test_fresh_pid_namespace_and_hostname(client):
    out = client.run(["sh", "-c", "echo $$; hostname; ls /proc | grep -c '^[0-9]'"])[3].split()
    assert out[0] == b"2"  # PID 1 is the agent's per-exec init
    assert out[1] == b"boxtest"
    assert int(out[2]) <= 4


def test_background_processes_do_not_keep_output_open(client):
    start = time.monotonic()
    code = client.run(["sh", "-c", "sleep 30 & echo started"])[0]
    assert code == 0
    assert time.monotonic() - start < 5


def test_concurrent_execs(client):
    sessions = [client.exec(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(8)]
    outs = [b"".join(d for _, d in s.events()) for s in sessions]
    assert outs == [f"{i}\n".encode() for i in range(8)]
    assert all(s.wait().exit_code == 0 for s in sessions)
