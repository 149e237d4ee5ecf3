"""Issue 12, findings 3 and 10, with real boxes driven through the `boxlite` CLI.

A run or exec ends, and leaves nothing behind, on every way a user or a supervisor ends it:
a closed stdout (`| head`), SIGTERM (timeout, CI, systemd), SIGHUP (a closed terminal), a
second signal during the teardown; and an exec whose box is removed underneath says so.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boxlite_core.runtime.box import BoxGoneError
from boxlite_core.runtime.runtime import Runtime
from boxlite_testing.cli import boxlite_env
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm

#: generous: under TCG on a loaded 2-core host a boot takes up to a few minutes
BOOT_WAIT = float(os.environ.get("BOXLITE_BOOT_TIMEOUT") or 300) + 60
#: how long the CLI may take to tear a box down after the event that ends it
TEARDOWN_WAIT = 120.0


def _default_signal_actions() -> None:
    """In the CLI child, before exec: the default action for the teardown signals, as a
    terminal's shell gives. A runner started under ``nohup`` hands SIGHUP down ignored, and
    the CLI keeps an inherited ignore (nohup's contract), so a SIGHUP test would see the
    SIGTERM that follows it instead (CI measured exactly that: 143 for 129)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _cli(home: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "boxlite_core.cli.main", *args],
        env=boxlite_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_default_signal_actions, **kw,
    )


def _cli_run(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", *args],
        env=boxlite_env(home), capture_output=True, text=True, timeout=timeout,
    )


def _read_until(proc: subprocess.Popen, needle: bytes, timeout: float) -> bytes:
    """Read the CLI's stdout until ``needle`` shows up (the command is running in the box)."""
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise AssertionError(f"no {needle!r} on stdout in {timeout}s")
        if select.select([fd], [], [], min(left, 1.0))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stdout closed before {needle!r}; stderr: "
                                     f"{proc.stderr.read()!r}")
            seen += chunk
    return seen


def _records(home: Path) -> dict[str, dict]:
    proc = _cli_run(home, "ls", "-a", "--json")
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in json.loads(proc.stdout)}


def _box_id(home: Path, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _records(home).get(name)
        if record:
            return record["id"]
        time.sleep(0.5)
    raise AssertionError(f"box {name} never appeared in `boxlite ls -a`")


def _processes_of(home: Path, box_id: str) -> list[str]:
    """Host processes (qemu, shim, virtiofsd, log writer) whose command line names the box
    directory: what an orphaned box leaves running."""
    box_dir = str(home / "boxes" / box_id)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if box_dir in args:
            found.append(f"{entry.name}: {args[:160]}")
    return found


def _assert_no_orphans(home: Path, box_id: str) -> None:
    deadline = time.monotonic() + 15  # a helper may take a moment to be reaped
    while (left := _processes_of(home, box_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], left


def _finish(proc: subprocess.Popen, timeout: float = TEARDOWN_WAIT) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"boxlite did not end within {timeout}s; stderr: {err!r}") from None
    return proc.returncode, err.decode(errors="replace")


def _force_remove(home: Path, name: str) -> None:
    if name in _records(home):
        _cli_run(home, "rm", "-f", name, timeout=180)


# -- run: a closed stdout ------------------------------------------------------------------


def test_run_into_head_ends_with_141_and_removes_the_box(vm_home):
    """`boxlite run --rm busybox yes | head -c 1000000` ends; nothing of the box is left."""
    name = unique("c-pipe")
    proc = _cli(vm_home, "run", "--rm", "--name", name, "busybox", "yes")
    try:
        box_id = _box_id(vm_home, name)
        got = b""
        deadline = time.monotonic() + BOOT_WAIT
        while len(got) < 1_000_000:  # what `head -c 1000000` does, then it exits
            assert time.monotonic() < deadline, "no output from `yes`"
            chunk = proc.stdout.read1(1_000_000 - len(got))
            assert chunk, f"stdout ended early; stderr: {proc.stderr.read()!r}"
            got += chunk
        proc.stdout.close()
        code, err = _finish(proc)
        assert code == 141, err
        assert "error" not in err.lower() and "Exception ignored" not in err, err
        assert got[:4] == b"y\ny\n"
        assert name not in _records(vm_home)
        _assert_no_orphans(vm_home, box_id)
    finally:
        if proc.poll() is None:
            proc.kill()
        _force_remove(vm_home, name)


# -- run: SIGTERM / SIGHUP -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [(signal.SIGTERM, None, 143), (signal.SIGHUP, signal.SIGTERM, 129)],
    ids=["sigterm", "sighup-then-sigterm-during-teardown"],
)
def test_signal_tears_down_an_rm_run(vm_home, first, second, code):
    name = unique("c-sig")
    proc = _cli(vm_home, "run", "--rm", "--name", name, "busybox",
                "sh", "-c", "echo started; exec sleep 1000")
    try:
        box_id = _box_id(vm_home, name)
        _read_until(proc, b"started", BOOT_WAIT)
        proc.send_signal(first)
        if second is not None:
            time.sleep(0.2)  # the first signal's teardown is under way (it takes ~1 s)
            proc.send_signal(second)
        rc, err = _finish(proc)
        assert rc == code, err
        assert err.strip().splitlines()[-1] == (
            f"boxlite: error: interrupted by {signal.Signals(first).name}"
        ), err
        assert name not in _records(vm_home), "--rm box survived the signal"
        _assert_no_orphans(vm_home, box_id)
    finally:
        if proc.poll() is None:
            proc.kill()
        _force_remove(vm_home, name)


def test_sigterm_stops_a_run_without_rm_and_records_it(vm_home):
    name = unique("c-keep")
    proc = _cli(vm_home, "run", "--name", name, "busybox",
                "sh", "-c", "echo started; exec sleep 1000")
    try:
        box_id = _box_id(vm_home, name)
        _read_until(proc, b"started", BOOT_WAIT)
        proc.send_signal(signal.SIGTERM)
        rc, err = _finish(proc)
        assert rc == 143, err
        record = _records(vm_home)[name]
        assert record["status"] == "stopped", record
        _assert_no_orphans(vm_home, box_id)
    finally:
        if proc.poll() is None:
            proc.kill()
        _force_remove(vm_home, name)


# -- exec: SIGTERM and a closed stdout kill the command in the box ---------------------------


@pytest.fixture(scope="module")
def detached(vm_home):
    name = unique("c-exec")
    proc = _cli_run(vm_home, "run", "-d", "--name", name, "--memory", "256", "busybox",
                    timeout=BOOT_WAIT)
    assert proc.returncode == 0, proc.stderr
    yield name
    _force_remove(vm_home, name)


def _heartbeat(home: Path, box: str, path: str) -> str:
    proc = _cli_run(home, "exec", box, "--", "cat", path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _assert_stopped_beating(home: Path, box: str, path: str) -> None:
    """The heartbeat loop writes ``path`` every 0.2 s while alive (each exec has its own pid
    namespace, so `ps` in another exec cannot see it; the shared root filesystem can)."""
    first = _heartbeat(home, box, path)
    time.sleep(3)
    assert _heartbeat(home, box, path) == first, "the command is still running in the box"


BEAT = "i=0; while :; do i=$((i+1)); echo $i > {path}; sleep 0.2; done"


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/tmp/beat-term", ""),
        # the command ignores TERM: the CLI escalates to SIGKILL after its grace
        ("/tmp/beat-stubborn", "trap '' TERM INT HUP; "),
    ],
    ids=["kills-the-command", "escalates-to-sigkill-when-ignored"],
)
def test_sigterm_to_exec(vm_home, detached, path: str, prefix: str):
    script = f"{prefix}echo started; {BEAT.format(path=path)}"
    proc = _cli(vm_home, "exec", detached, "--", "sh", "-c", script)
    try:
        _read_until(proc, b"started", 120)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        rc, err = _finish(proc)
        assert rc == 143, err
        _assert_stopped_beating(vm_home, detached, path)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exec_into_head_kills_the_command_and_exits_141(vm_home, detached):
    path = "/tmp/beat-pipe"
    script = f"({BEAT.format(path=path)}) & exec yes"
    proc = _cli(vm_home, "exec", detached, "--", "sh", "-c", script)
    try:
        got = proc.stdout.read(100_000)
        assert len(got) == 100_000
        proc.stdout.close()
        rc, err = _finish(proc)
        assert rc == 141, err
        assert err == "", err
        _assert_stopped_beating(vm_home, detached, path)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- finding 10: an exec whose box is removed underneath ------------------------------------


def test_exec_during_rm_f_names_the_removal(vm_home):
    """API: one thread runs exec while another removes the box → BoxGoneError, not a bare
    signal 9. CLI: the same race gives exit 137 with one error line naming the removal."""
    name = unique("c-gone")
    proc = _cli_run(vm_home, "run", "-d", "--name", name, "--memory", "256", "busybox",
                    timeout=BOOT_WAIT)
    assert proc.returncode == 0, proc.stderr
    cli_exec = None
    try:
        with Runtime(vm_home) as rt:
            box = rt.get(name)
            outcome: dict[str, object] = {}

            def api_exec() -> None:
                try:
                    outcome["result"] = box.exec(["sleep", "1000"])
                except BaseException as exc:  # the test inspects it
                    outcome["error"] = exc

            worker = threading.Thread(target=api_exec)
            worker.start()
            cli_exec = _cli(vm_home, "exec", name, "--", "sh", "-c", "echo started; sleep 1000")
            _read_until(cli_exec, b"started", 120)
            time.sleep(1)
            removed = _cli_run(vm_home, "rm", "-f", name, timeout=180)
            assert removed.returncode == 0, removed.stderr
            worker.join(TEARDOWN_WAIT)
            assert not worker.is_alive()
            assert "result" not in outcome, f"exec returned {outcome.get('result')!r}"
            error = outcome["error"]
            assert isinstance(error, BoxGoneError), repr(error)
            assert f"box {name} was removed while the command ran (boxlite rm -f)" in str(error)
        rc, err = _finish(cli_exec)
        assert rc == 137, err
        lines = err.strip().splitlines()
        assert lines == [
            f"boxlite: error: box {name} was removed while the command ran (boxlite rm -f); "
            "the command was killed"
        ], err
    finally:
        if cli_exec is not None and cli_exec.poll() is None:
            cli_exec.kill()
        _force_remove(vm_home, name)


# -- --rm holds when the start fails ---------------------------------------------------------


def test_rm_removes_a_box_whose_boot_failed(vm_home):
    """A real boot that cannot finish (1 s to reach the agent under TCG; a kernel boot: a boot
    template would answer in time): with --rm the box is removed, the VM and its helpers are
    gone, and the one error line says why."""
    name = unique("c-boot")
    env = {**boxlite_env(vm_home), "BOXLITE_BOOT_TIMEOUT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "boxlite_core.cli.main", "run", "--rm", "--no-template",
         "--name", name, "busybox", "true"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        box_id = _box_id(vm_home, name)
        rc, err = _finish(proc, timeout=BOOT_WAIT)
        errors = [line for line in err.splitlines() if line.startswith("boxlite: error: ")]
        assert rc != 0 and len(errors) == 1, err
        assert f"box {name}: start failed in " in errors[0]
        assert "console:" in errors[0] and f"(box {name} removed: --rm)" in errors[0]
        assert "kept for diagnosis" not in err
        assert name not in _records(vm_home)
        assert not (vm_home / "boxes" / box_id).exists()
        _assert_no_orphans(vm_home, box_id)
    finally:
        if proc.poll() is None:
            proc.kill()
        _force_remove(vm_home, name)
