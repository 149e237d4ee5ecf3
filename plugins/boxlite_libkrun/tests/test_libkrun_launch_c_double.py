"""launch() end to end at the ABI level, against a C test double of libkrun (no VM, no KVM).

The real launcher child process dlopens the double through cffi and replays the plan; the
double logs every call with its C argument values, so these tests check what libkrun would
have been told — types and order included (uint8 vCPUs, bool read-only flags, ctx threading).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_core.vmm.procstat import start_time
from boxlite_core.vmm.spec import DiskSpec
from boxlite_libkrun.backend import LibkrunBackend

CTX = 5  # the double's context id: every per-context call must carry it


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_launch_c_double_replays_calls_in_order(use_c_double, spec_factory):
    spec = spec_factory()
    box = spec.box_dir
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec))
    assert handle.wait(10)
    assert handle.exit_reason() == "launcher exited with code 0"
    assert _log_lines(use_c_double) == [
        "krun_set_log_level(1)",
        "krun_create_ctx()",
        f"krun_set_vm_config({CTX},2,768)",
        f"krun_set_kernel({CTX},{spec.kernel},1,{spec.initrd},"
        "console=hvc0 quiet loglevel=3 panic=-1 reboot=t boxlite.agent_vsock=1024)",
        "krun_has_feature(1)",
        f"krun_add_disk2({CTX},rootfs,{box}/rootfs.qcow2,1,0)",
        f"krun_add_disk2({CTX},guestroot,{box}/kit/guestroot.raw,0,1)",
        f"krun_add_virtiofs({CTX},vol0,/srv/data)",
        f"krun_add_virtiofs3({CTX},vol1,/srv/ro,0,1)",
        f"krun_disable_implicit_vsock({CTX})",
        f"krun_add_vsock({CTX},0)",
        f"krun_add_vsock_port2({CTX},1024,{box}/agent.sock,1)",
        f"krun_set_console_output({CTX},{box}/console.fifo)",
        f"krun_start_enter({CTX})",
    ]
    state = json.loads((box / "vm.json").read_text())
    assert state["pid"] == handle.pid and state["backend"] == "libkrun"


def test_launch_c_double_root_mode_passes_exec_argv_and_env(use_c_double, spec_factory):
    spec = spec_factory(
        disks=(),
        shares=(),
        backend_options={
            "krun_root": "/srv/rootfs",
            "krun_exec": ["/bin/agent", "--port", "1024"],
            "krun_env": {"HOME": "/root"},
            "krun_workdir": "/",
        },
    )
    backend = LibkrunBackend()
    assert backend.launch(backend.plan(spec)).wait(10)
    lines = _log_lines(use_c_double)
    assert lines[3:6] == [
        f"krun_set_root({CTX},/srv/rootfs)",
        f"krun_set_workdir({CTX},/)",
        f"krun_set_exec({CTX},/bin/agent,[--port,1024],[HOME=/root])",
    ]


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ("krun_add_disk2", "krun_add_disk2 failed: -22 (EINVAL: Invalid argument)"),
        (
            "krun_add_vsock_port2:98",
            "krun_add_vsock_port2 failed: -98 (EADDRINUSE: Address already in use)",
        ),
        ("krun_create_ctx:12", "krun_create_ctx failed: -12 (ENOMEM: Cannot allocate memory)"),
    ],
)
def test_launch_c_double_negative_errno_raises_naming_the_call(
    use_c_double, spec_factory, monkeypatch, fail, message
):
    monkeypatch.setenv("KRUN_DOUBLE_FAIL", fail)
    spec = spec_factory()
    backend = LibkrunBackend()
    with pytest.raises(EngineError) as info:
        backend.launch(backend.plan(spec))
    assert message in str(info.value)
    assert "box b1" in str(info.value) and "libkrun.log" in str(info.value)
    lines = _log_lines(use_c_double)
    assert lines[-1].startswith(fail.split(":")[0] + "(")  # stopped at the failing call
    assert not any(ln.startswith("krun_start_enter") for ln in lines)
    assert not (spec.box_dir / "vm.json").exists()


def test_launch_c_double_start_enter_error_surfaces_in_exit_reason(
    use_c_double, spec_factory, monkeypatch
):
    monkeypatch.setenv("KRUN_DOUBLE_ENTER", "return")
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec_factory()))
    assert handle.wait(10)
    reason = handle.exit_reason()
    assert reason.startswith("launcher exited with code 71")
    assert "krun_start_enter failed: -22 (EINVAL: Invalid argument)" in reason


def test_launch_c_double_without_blk_feature_fails_clearly(use_c_double, spec_factory, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_NO_BLK", "1")
    backend = LibkrunBackend()
    with pytest.raises(EngineError, match=r"krun_has_feature\(1\) returned 0.*BLK"):
        backend.launch(backend.plan(spec_factory()))


def test_launch_c_double_old_api_uses_fallbacks_then_names_missing_call(
    use_c_double, spec_factory, monkeypatch, c_double_old_lib
):
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(c_double_old_lib))
    spec = spec_factory(
        disks=(DiskSpec(Path("/img/root.raw"), format="raw", serial="r"),), shares=()
    )
    backend = LibkrunBackend()
    with pytest.raises(EngineError, match=r"krun_add_vsock_port2 failed; .*does not export it"):
        backend.launch(backend.plan(spec))
    lines = _log_lines(use_c_double)
    assert f"krun_add_disk({CTX},r,/img/root.raw,0)" in lines  # raw falls back to add_disk
    assert not any("has_feature" in ln or "implicit_vsock" in ln for ln in lines)


def test_stop_c_double_vm_running_until_signalled(use_c_double, spec_factory, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_ENTER", "serve")
    spec = spec_factory()
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec))
    try:
        assert handle.is_running()
        # the double binds the agent socket as libkrun would: owner-only (launcher umask 077)
        assert _wait_for(spec.agent.socket.exists)
        mode = spec.agent.socket.stat().st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o077 == 0
        # another process re-adopts it from the box directory
        adopted = LibkrunBackend().attach(spec.box_dir)
        assert adopted is not None and adopted.pid == handle.pid and adopted.is_running()
        handle.stop(timeout=5)
        assert not handle.is_running()
        assert handle.exit_reason().startswith("killed by signal 15 (SIGTERM)")
        assert adopted.wait(5) and not adopted.is_running()
        assert LibkrunBackend().attach(spec.box_dir) is None
    finally:
        handle.kill()


def test_kill_c_double(use_c_double, spec_factory, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_ENTER", "serve")
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec_factory()))
    handle.kill()
    assert not handle.is_running()
    assert handle.exit_reason().startswith("killed by signal 9 (SIGKILL)")
    handle.kill()  # idempotent
    handle.stop()


def test_attach_rejects_a_recycled_pid(tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    me = os.getpid()
    (box / "vm.json").write_text(
        json.dumps(
            {
                "backend": "libkrun",
                "pid": me,
                "start_time": start_time(me) + 1,
                "log": str(box / "libkrun.log"),
            }
        )
    )
    assert LibkrunBackend().attach(box) is None
    assert LibkrunBackend().attach(tmp_path / "nothing-here") is None


def test_launch_without_library_raises_with_fix(spec_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(tmp_path / "missing.so"))
    backend = LibkrunBackend()
    with pytest.raises(EngineError, match="libkrun not found; install libkrun"):
        backend.launch(backend.plan(spec_factory()))


# -- the guest console and libkrun's own log: capped, rotated, stopped with the VM -----------

CAP = 256 * 1024


def _files(path: Path) -> dict[str, int]:
    """Sizes of ``path`` and its rotated copies."""
    return {p.name: p.stat().st_size for p in sorted(path.parent.glob(path.name + "*"))}


def _last_line(path: Path) -> bytes:
    return path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]


def _writer_pid(box: Path) -> int:
    return json.loads((box / "logwriter.json").read_text())["pid"]


def test_launch_c_double_console_flood_stays_under_the_cap(use_c_double, spec_factory, monkeypatch):
    # the double writes 8 MiB to the console path libkrun was given (a guest flooding hvc0)
    # and 3 MiB of error lines to its stderr (libkrun's own log, which a guest can provoke)
    monkeypatch.setenv("KRUN_DOUBLE_CONSOLE", str(8 * 1024 * 1024))
    monkeypatch.setenv("KRUN_DOUBLE_STDERR", str(3 * 1024 * 1024))
    spec = spec_factory(console_log_max_bytes=CAP)
    box = spec.box_dir
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec))
    state = box / "logwriter.json"
    writer = json.loads(state.read_text())["pid"] if state.exists() else None
    assert handle.wait(60)
    assert handle.exit_reason() == "launcher exited with code 0"
    handle.release()
    for log, end in ((box / "console.log", b"console end"), (box / "libkrun.log", b"stderr end")):
        sizes = _files(log)
        assert set(sizes) == {log.name, log.name + ".1", log.name + ".2"}, sizes
        assert all(0 < size <= CAP for size in sizes.values()), sizes
        assert sum(sizes.values()) <= 3 * CAP
        assert _last_line(log) == end  # the newest bytes are kept, the oldest dropped
        # rotated copies hold the lines just before, whole lines in order
        older = (log.parent / (log.name + ".1")).read_bytes().splitlines()
        numbers = [int(ln.split(b" line ")[1][:9]) for ln in older if b" line " in ln]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert (box / "console.fifo").is_fifo()
    assert writer is not None and start_time(writer) is None  # drained and exited with the VM
    assert not state.exists()


def test_launch_c_double_keeps_early_console_lines_and_stops_writer_on_kill(
    use_c_double, spec_factory, monkeypatch
):
    monkeypatch.setenv("KRUN_DOUBLE_CONSOLE", "2000")
    monkeypatch.setenv("KRUN_DOUBLE_ENTER", "serve")
    spec = spec_factory(console_log_max_bytes=CAP)
    box = spec.box_dir
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec))
    try:
        console = spec.console_log
        # the writer was reading before libkrun opened the pipe: the first line is there
        assert _wait_for(lambda: console.exists() and console.read_bytes().endswith(b"end\n"))
        assert console.read_bytes().startswith(b"console line 000000000: ")
        writer = _writer_pid(box)
        assert start_time(writer) is not None
        handle.kill()
        assert start_time(writer) is None  # stopped with the VM (pid + start time checked)
        assert not (box / "logwriter.json").exists()
    finally:
        handle.kill()


def test_attach_c_double_restarts_a_dead_console_writer(use_c_double, spec_factory, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_CONSOLE", "2000")
    monkeypatch.setenv("KRUN_DOUBLE_ENTER", "serve")
    spec = spec_factory(console_log_max_bytes=CAP)
    box = spec.box_dir
    backend = LibkrunBackend()
    handle = backend.launch(backend.plan(spec))
    try:
        assert _wait_for(lambda: spec.console_log.exists() and spec.console_log.stat().st_size)
        before = spec.console_log.read_bytes()
        old = _writer_pid(box)
        os.kill(old, 9)
        assert _wait_for(lambda: start_time(old) is None)
        adopted = LibkrunBackend().attach(box)  # a later host process finds the box
        assert adopted is not None and adopted.is_running()
        new = _writer_pid(box)
        assert new != old and start_time(new) is not None
        assert spec.console_log.read_bytes().startswith(before)  # appended, not truncated
        adopted.kill()
        assert start_time(new) is None
    finally:
        handle.kill()
