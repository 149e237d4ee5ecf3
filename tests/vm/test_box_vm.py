from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from boxlite_core.errors import GuestError
from boxlite_core.models import BoxOptions, BoxStatus
from boxlite_core.tools import find_tool
from boxlite_testing.cli import boxlite_env
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(box, code):
    result = box.exec(["sh", "-c", f"exit {code}"])
    assert result.exit_code == code and result.returncode == code
    assert result.signal is None and not result.timed_out


def test_signal_exit(box):
    result = box.exec(["sh", "-c", "kill -9 $$"])
    assert result.signal == 9 and result.returncode == 137


def test_stdout_stderr_separated(box):
    result = box.exec(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert result.stdout == b"out\nout2\n" and result.stderr == b"err\n"


def test_large_output_intact(box):
    size = 10 * 1024 * 1024
    made = box.exec(["sh", "-c", f"head -c {size} /dev/urandom > /tmp/big && sha256sum /tmp/big"])
    assert made.ok, made.stderr
    expected = made.text.split()[0]
    result = box.exec(["cat", "/tmp/big"])
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).hexdigest() == expected


def test_stdin_piped(box):
    data = b"".join(b"line %d\n" % i for i in range(20000))
    result = box.exec(["cat"], input=data)
    assert result.stdout == data


def test_stream_stdin_and_events(box):
    ex = box.exec_stream(["sh", "-c", "read a; echo got:$a; echo bye >&2"], stdin=True)
    ex.write_stdin(b"hello\n")
    ex.close_stdin()
    seen = {"stdout": b"", "stderr": b""}
    for stream, data in ex.events():
        seen[stream] += data
    assert ex.wait().exit_code == 0
    assert seen == {"stdout": b"got:hello\n", "stderr": b"bye\n"}


def test_env_and_cwd(box):
    result = box.exec(["sh", "-c", 'echo "$FOO"; pwd'], env={"FOO": "bar baz"}, cwd="/tmp")
    assert result.text == "bar baz\n/tmp\n"


def test_timeout_kills(box):
    began = time.monotonic()
    result = box.exec(["sleep", "60"], timeout=1)
    assert result.timed_out and result.returncode == 124
    assert time.monotonic() - began < 20


def test_rw_and_ro_volumes_9p(box, volumes):
    if not box.record.options.volumes:
        pytest.skip("the 9p volume sharer is not registered")
    rw, ro = volumes
    assert box.exec(["sh", "-c", "echo from-guest > /mnt/rw/new.txt"]).ok
    assert (rw / "new.txt").read_text() == "from-guest\n"
    assert box.exec(["cat", "/mnt/ro/keep.txt"]).text == "original\n"
    bad = box.exec(["sh", "-c", "echo changed > /mnt/ro/keep.txt"])
    assert bad.exit_code != 0
    assert (ro / "keep.txt").read_text() == "original\n"


@pytest.mark.skipif(find_tool("virtiofsd") is None, reason="virtiofsd is not installed")
def test_rw_and_ro_volumes_virtiofs(runtime, tmp_path):
    if "virtiofs" not in runtime.plugins.sharer_names():
        pytest.skip("the virtiofs volume sharer is not registered")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "keep.txt").write_text("original\n")
    options = BoxOptions(
        image="busybox",
        name=unique("vfs"),
        memory_mib=256,
        volumes=[f"{rw}:/mnt/rw", f"{ro}:/mnt/ro:ro"],
        volume_sharer="virtiofs",
    )
    b = runtime.create(options)
    try:
        b.start()
        assert b.exec(["sh", "-c", "echo hi > /mnt/rw/f"]).ok
        assert (rw / "f").read_text() == "hi\n"
        assert b.exec(["sh", "-c", "echo x > /mnt/ro/keep.txt"]).exit_code != 0
        assert (ro / "keep.txt").read_text() == "original\n"
    finally:
        runtime.remove(b.id, force=True)


def test_copy_in_and_out(box, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    box.exec(["mkdir", "-p", "/data"])
    box.copy_in(src, "/data/")
    assert box.exec(["cat", "/data/tree/a.txt"]).text == "alpha\n"
    box.copy_in(src / "a.txt", "/data/renamed.txt")
    assert box.exec(["cat", "/data/renamed.txt"]).text == "alpha\n"
    out = tmp_path / "out"
    out.mkdir()
    box.copy_out("/data/tree", out)
    assert (out / "tree" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    box.copy_out("/data/renamed.txt", out / "file.txt")
    assert (out / "file.txt").read_text() == "alpha\n"


def test_reattach_from_second_process(box, vm_home):
    box.exec(["true"])  # this process holds a live connection; the other must not wait for it
    proc = subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", "exec", box.name, "--", "echo", "hi"],
        env=boxlite_env(vm_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi\n"
    assert box.exec(["echo", "back"]).text == "back\n"  # and this process re-attaches


def _cli(vm_home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", *args],
        env=boxlite_env(vm_home), capture_output=True, text=True, timeout=120,
    )


def test_cli_pause_freezes_the_box_until_resume(box, vm_home):
    """`boxlite pause` freezes a command in flight until `boxlite resume`; a new exec on the
    paused box is refused at once with the fix (docker's rule: an exec that would hang with no
    word until someone resumes is worse than a clear refusal)."""
    assert box.exec(["rm", "-f", "/root/started"]).ok
    done = threading.Event()
    result = {}

    def run() -> None:
        # long enough that `boxlite pause` (a CLI process: seconds under load) lands first
        result["r"] = box.exec(["sh", "-c", "touch /root/started; sleep 6; echo after"],
                               timeout=120)
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while box.exec(["test", "-e", "/root/started"], timeout=60).exit_code != 0:
        assert time.monotonic() < deadline, "the command never started in the guest"
    paused = _cli(vm_home, "pause", box.name)
    assert paused.returncode == 0, paused.stderr
    try:
        assert not done.wait(7.0), "a command finished while `boxlite pause` had frozen the box"
        refused = _cli(vm_home, "exec", box.name, "--", "echo", "no")
        assert refused.returncode != 0
        assert "paused" in refused.stderr and f"boxlite resume {box.name}" in refused.stderr
        listed = _cli(vm_home, "ls")
        assert box.name in listed.stdout and "paused" in listed.stdout
    finally:
        resumed = _cli(vm_home, "resume", box.name)
    assert resumed.returncode == 0, resumed.stderr
    assert done.wait(60), "the command frozen by pause never finished after `boxlite resume`"
    assert result["r"].text == "after\n"


def test_metrics_count_execs(box, runtime):
    before = box.metrics()["execs"]
    box.exec(["true"])
    m = box.metrics()
    assert m["execs"] == before + 1
    for stage in ("filesystem_setup", "vmm_spawn", "guest_connect", "guest_init"):
        assert stage in m["stage_timings"]
    assert runtime.metrics()["boxes_running"] >= 1


def test_stop_restart_keeps_data_and_rm_cleans(runtime):
    b = runtime.create(BoxOptions(image="busybox", name=unique("restart"), memory_mib=256))
    b.start()
    assert b.exec(["sh", "-c", "echo persisted > /root/keep"]).ok
    b.stop()
    assert b.status is BoxStatus.STOPPED and b.record.pid is None
    b.start()
    assert b.exec(["cat", "/root/keep"]).text == "persisted\n"
    box_dir = b.dir
    runtime.remove(b.id, force=True)
    assert not box_dir.exists()
    assert b.id not in {r.id for r in runtime.list()}


def test_vm_killed_during_exec(runtime):
    b = runtime.create(BoxOptions(image="busybox", name=unique("doomed"), memory_mib=256))
    b.start()
    try:
        pid = b.record.pid
        assert pid
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(GuestError, match=f"box {b.name}: VM stopped during exec"):
            b.exec(["sleep", "60"])
        rec = b.record
        assert rec.status is BoxStatus.FAILED  # SIGKILL is not a clean power-off
        assert rec.error and "VM stopped during exec" in rec.error
        assert b.dir.exists()  # files kept
    finally:
        runtime.remove(b.id, force=True)


def test_cli_run_streams_and_exits_with_code(vm_home):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "boxlite_core.cli.main",
            "run",
            "--rm",
            "--name",
            unique("clirun"),
            "busybox",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        env=boxlite_env(vm_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "out\n" and proc.stderr == "err\n"
