"""The real runner process and HvfBackend.launch/attach/stop, over a framework TEST DOUBLE.

Virtualization.framework cannot run on Linux, so ``BOXLITE_HVF_API_FACTORY`` points the
runner at ``hvf_vz_double`` — a guest whose vsock port is an echo server. Everything else is
real: the child process, the JSON config on stdin, qemu-img's qcow2 → raw conversion, the
0600 unix socket and its bridge, vm.json with pid + start time, signals and exit codes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hvf_specs import make_spec

from boxlite_core.tools import find_tool
from boxlite_core.vmm.spec import DiskSpec
from boxlite_hvf.backend import HvfBackend
from boxlite_hvf.runner import API_FACTORY_ENV

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def double_env(monkeypatch):
    monkeypatch.setenv(API_FACTORY_ENV, "hvf_vz_double:recording")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    )
    monkeypatch.delenv("BOXLITE_HVF_DOUBLE", raising=False)


def raw_spec(box: Path, **changes):
    return make_spec(box, disks=(DiskSpec(box / "g.raw", format="raw", serial="g"),), **changes)


def dial(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def talk(sock: socket.socket, text: bytes) -> bytes:
    banner = b""
    while not banner.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, "bridge closed before the guest answered"
        banner += chunk
    sock.sendall(text)
    sock.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return banner + out


def runner_log(box: Path) -> str:
    return (box / "hvf" / "runner.log").read_text()


@pytest.mark.skipif(find_tool("qemu-img") is None, reason="needs qemu-img (qemu-utils)")
def test_launch_converts_bridges_attaches_and_stops(tmp_path):
    backend = HvfBackend(arch="x86_64")
    spec = make_spec(tmp_path, shares=())
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(spec.disks[0].path), "16M"], check=True
    )
    handle = backend.launch(backend.plan(spec))
    try:
        raw = tmp_path / "hvf" / "00-rootfs.raw"
        assert raw.stat().st_size == 16 * 1024 * 1024  # qemu-img really made a raw image
        record = json.loads((tmp_path / "vm.json").read_text())
        assert record["pid"] == handle.pid and record["backend"] == "hvf"
        assert record["start_time"]
        with dial(spec.agent.socket) as sock:
            assert talk(sock, b"hello guest") == b"port 1024\nHELLO GUEST"
        assert stat.S_IMODE(spec.agent.socket.stat().st_mode) == 0o600
        # two connections at once are two independent streams
        with dial(spec.agent.socket) as a, dial(spec.agent.socket) as b:
            assert talk(a, b"a" * 300_000) == b"port 1024\n" + b"A" * 300_000
            assert talk(b, b"b") == b"port 1024\nB"

        adopted = HvfBackend().attach(tmp_path)
        assert adopted is not None and adopted.pid == handle.pid and adopted.is_running()
        adopted.stop(timeout=10)
        assert adopted.wait(10) and handle.wait(10)
        assert handle.exit_reason().startswith("the VM stopped")
        assert HvfBackend().attach(tmp_path) is None
        assert not spec.agent.socket.exists()
        assert "vm running" in runner_log(tmp_path)
    finally:
        handle.kill()


def test_runner_retries_while_the_guest_agent_boots(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", "refuse=4")
    backend = HvfBackend()
    spec = raw_spec(tmp_path)
    handle = backend.launch(backend.plan(spec))
    try:
        with dial(spec.agent.socket) as sock:
            assert talk(sock, b"x") == b"port 1024\nX"
    finally:
        handle.stop(10)


def test_guest_ignoring_poweroff_is_forced_after_stop_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", "ignore-stop")
    backend = HvfBackend(stop_timeout=0.5)
    handle = backend.launch(backend.plan(raw_spec(tmp_path)))
    dial(raw_spec(tmp_path).agent.socket).close()  # up and serving
    started = time.monotonic()
    handle.stop(timeout=10)
    assert not handle.is_running()
    assert time.monotonic() - started < 8
    assert "forcing the VM off" in runner_log(tmp_path)
    assert handle.exit_reason().startswith("the VM stopped")


def test_guest_poweroff_ends_the_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", "poweroff-after=0.3")
    backend = HvfBackend()
    handle = backend.launch(backend.plan(raw_spec(tmp_path)))
    assert handle.wait(15)
    assert "vm stopped" in runner_log(tmp_path)


def test_start_failure_and_refused_config_are_reported(tmp_path, monkeypatch):
    backend = HvfBackend()
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", "fail-start")
    handle = backend.launch(backend.plan(raw_spec(tmp_path / "a")))
    assert handle.wait(15)
    assert "ended in error" in handle.exit_reason() and "double says no" in handle.exit_reason()

    monkeypatch.setenv(API_FACTORY_ENV, "hvf_vz_double:refusing")
    monkeypatch.delenv("BOXLITE_HVF_DOUBLE")
    handle = backend.launch(backend.plan(raw_spec(tmp_path / "b")))
    assert handle.wait(15)
    reason = handle.exit_reason()
    assert "configuration was refused" in reason and "does not validate" in reason


def test_kill_is_immediate_and_a_recycled_pid_is_not_adopted(tmp_path):
    backend = HvfBackend()
    handle = backend.launch(backend.plan(raw_spec(tmp_path)))
    dial(raw_spec(tmp_path).agent.socket).close()
    handle.kill()
    assert not handle.is_running()
    assert "signal 9" in handle.exit_reason()
    assert backend.attach(tmp_path) is None
    # a live process with the recorded pid but another start time is not our runner
    record = json.loads((tmp_path / "vm.json").read_text())
    record.update(pid=os.getpid(), start_time="linux:1")
    (tmp_path / "vm.json").write_text(json.dumps(record))
    assert backend.attach(tmp_path) is None


WATCHED_LAUNCHER = """
import sys
from pathlib import Path
from hvf_specs import make_spec
from boxlite_core.vmm.spec import DiskSpec
from boxlite_hvf.backend import HvfBackend
box = Path({box!r})
spec = make_spec(box, disks=(DiskSpec(box / "g.raw", format="raw"),),
                 backend_options={{"hvf_watch_parent": {watch}}})
handle = HvfBackend().launch(HvfBackend().plan(spec))
print(handle.pid, flush=True)
"""


@pytest.mark.parametrize("watch", [True, False])
def test_watch_parent_decides_whether_the_vm_outlives_its_launcher(tmp_path, watch):
    code = WATCHED_LAUNCHER.format(here=str(HERE), box=str(tmp_path), watch=watch)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(out.stdout.split()[0])
    # the launcher has exited; with watch_parent the runner stops its VM within ~1 s
    handle = HvfBackend().attach(tmp_path)
    try:
        if watch:
            deadline = time.monotonic() + 10
            while handle is not None and handle.is_running() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert handle is None or not handle.is_running()
            assert "parent" in runner_log(tmp_path)
        else:
            assert handle is not None and handle.pid == pid
            time.sleep(1.5)
            assert handle.is_running()
    finally:
        if handle is not None:
            handle.kill()


# -- guest-fed output: the console and the runner's log are capped and rotated --------------

CAP = 256 * 1024


def _sizes(log: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(log.parent.glob(log.name + "*"))}


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_console_flood_double_stays_under_the_cap(tmp_path, monkeypatch):
    # the guest writes 8 MiB to its virtio console; the files on the host stay <= 3 x cap
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", f"console={8 * 1024 * 1024}")
    backend = HvfBackend()
    spec = raw_spec(tmp_path, console_log_max_bytes=CAP)
    handle = backend.launch(backend.plan(spec))
    log = spec.console_log
    try:
        assert _wait_for(lambda: log.exists() and log.read_bytes().endswith(b"console end\n")), (
            _sizes(log)
        )
        dial(spec.agent.socket).close()  # the VM still serves its agent
    finally:
        handle.stop(10)
    sizes = _sizes(log)
    assert set(sizes) == {"console.log", "console.log.1", "console.log.2"}, sizes
    assert all(0 < size <= CAP for size in sizes.values()), sizes
    older = (tmp_path / "console.log.1").read_bytes().splitlines()
    numbers = [int(ln.split(b" line ")[1][:9]) for ln in older]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # whole lines, in order


def test_early_console_lines_are_kept_and_the_runner_log_is_continued_capped(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("BOXLITE_HVF_DOUBLE", "console=2000")
    backend = HvfBackend()
    spec = raw_spec(tmp_path, console_log_max_bytes=CAP)
    (tmp_path / "hvf").mkdir(parents=True, exist_ok=True)
    earlier = b"hvf-runner[1]: an earlier boot's line\n" * (CAP // 38)  # ~CAP from before
    (tmp_path / "hvf" / "runner.log").write_bytes(earlier)
    handle = backend.launch(backend.plan(spec))
    try:
        assert _wait_for(lambda: spec.console_log.exists()
                         and spec.console_log.read_bytes().endswith(b"console end\n"))
        assert spec.console_log.read_bytes().startswith(b"console line 000000000: ")
    finally:
        handle.stop(10)
    runner = tmp_path / "hvf" / "runner.log"
    assert runner.stat().st_size <= CAP  # earlier boots rotated away, not piled on
    assert (tmp_path / "hvf" / "runner.log.1").read_bytes() == earlier
    assert "vm stopped" in runner_log(tmp_path)
