"""A real guest floods its serial console: the host keeps a capped, rotated console log.

The guest is root in its container: ``mknod`` of the serial port (char 4:64) and a write to it
reaches QEMU's 16550 UART, i.e. BOXDIR/console.log. Before, that file grew without limit
(~1 MiB/s measured) and ``boxlite logs`` read all of it into memory.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.vmm import consolelog
from boxlite_testing.homes import SHARED_HOME as HOME
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
CAP_MIB = 1
#: the guest writes this many 47-byte lines (~4.2 MiB with the tty's CR LF): more than the
#: cap and its two rotations hold (under TCG every byte is a UART exit: the size is the cost)
FLOOD_LINES = 90_000
SERIAL = "mknod /dev/bx-serial c 4 64 2>/dev/null; "


def flood_command(lines: int) -> list[str]:
    awk = ("BEGIN { for (i = 1; i <= LINES; i++) "
           'printf "flood-%08d-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\\n", i }')
    awk = awk.replace("LINES", str(lines))
    script = f"{SERIAL}awk '{awk}' > /dev/bx-serial; echo FLOOD-END > /dev/bx-serial"
    return ["sh", "-c", script]


def say(box, text: str) -> None:
    result = box.exec(["sh", "-c", SERIAL + f"echo {text} > /dev/bx-serial"], timeout=120)
    assert result.exit_code == 0, result


def boxlite_cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "BOXLITE_HOME": str(HOME)}
    env.pop("BOXLITE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "boxlite_core.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def capped_box(runtime):
    # a kernel boot: its boot lines are what the first test looks for (a box restored from a
    # boot template starts with none: its console begins where the template's VM was)
    box = runtime.create(BoxOptions(image="busybox", name=unique("consolecap"), memory_mib=256,
                                    console_log_max_mib=CAP_MIB, template=False))
    box.start()
    try:
        yield box
    finally:
        box.stop(timeout=10)
        runtime.remove(box.id, force=True)


def test_boot_lines_are_kept_until_the_first_rotation(capped_box) -> None:
    head = (capped_box.dir / "console.log").read_bytes()[:200]
    assert head.startswith(b"boxlite-init: start"), head
    assert consolelog.writer_running(capped_box.dir)


def test_a_flooding_guest_cannot_grow_the_console_log_past_its_cap(capped_box) -> None:
    box_dir: Path = capped_box.dir
    result = capped_box.exec(flood_command(FLOOD_LINES), timeout=1800)
    assert result.exit_code == 0, result
    deadline = time.monotonic() + 60
    while b"FLOOD-END" not in consolelog.tail_bytes(box_dir / "console.log", 3):
        assert time.monotonic() < deadline, consolelog.tail_bytes(box_dir / "console.log", 5)
        time.sleep(0.2)
    files = {p.name: p.stat().st_size for p in consolelog.log_files(box_dir / "console.log")}
    total = sum(files.values())
    assert total <= CAP_MIB * MIB * (consolelog.BACKUPS + 1) + 64 * 1024, files
    assert all(size <= CAP_MIB * MIB for size in files.values()), files
    # the newest lines are kept: the flood's last ones, then the end marker
    last = consolelog.tail_bytes(box_dir / "console.log", 2).decode()
    assert last == f"flood-{FLOOD_LINES:08d}-{'x' * 32}\r\nFLOOD-END\r\n", last
    # the writer's memory does not grow with the flood (fixed buffer)
    pid = int(consolelog._read_state(box_dir)["pid"])
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    hwm_kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    assert hwm_kib < 32 * 1024, f"writer peak RSS {hwm_kib} KiB"
    # the box is fine: it still answers
    assert capped_box.exec(["echo", "still here"], timeout=120).stdout == b"still here\n"
    # `boxlite logs -n 5`: exactly the last five lines
    cli = boxlite_cli("logs", "-n", "5", capped_box.name)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[-1] == "FLOOD-END" and len(lines) == 5
    assert lines[-2].startswith(f"flood-{FLOOD_LINES:08d}-")


def test_a_dead_writer_is_restarted_by_the_next_process(capped_box, vm_home) -> None:
    """The writer outlives boxlite; when it died, the next process to attach restarts it
    and QEMU (server=on) takes the new connection: the console is written again."""
    box_dir = capped_box.dir
    pid = int(consolelog._read_state(box_dir)["pid"])
    os.kill(pid, 9)
    assert consolelog.wait_writer(box_dir, 5)
    say(capped_box, "lost-while-no-writer")  # QEMU drops it: nobody is connected
    with Runtime(vm_home) as other:  # a new host process attaches
        again = other.get(capped_box.name)
        assert again.exec(["true"], timeout=120).exit_code == 0
        assert consolelog.writer_running(box_dir)
        say(again, "after-restart")
        deadline = time.monotonic() + 30
        while b"after-restart" not in consolelog.tail_bytes(box_dir / "console.log", 3):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        again.detach()


def test_logs_follow_prints_new_lines_and_ends_with_the_box(capped_box) -> None:
    follower = boxlite_cli("logs", "-f", "-n", "1", capped_box.name)
    try:
        time.sleep(3)  # the CLI starts and prints the last line
        say(capped_box, "FOLLOW-MARK")
        seen = b""
        deadline = time.monotonic() + 120
        while b"FOLLOW-MARK" not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            ready, _, _ = select.select([follower.stdout], [], [], 1.0)
            if ready:
                seen += os.read(follower.stdout.fileno(), 65536)
        assert follower.poll() is None, "logs -f ended while the box runs"
        capped_box.stop(timeout=10)
        assert follower.wait(60) == 0, follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


#: device resets the guest forces: ~400 bytes of virtiofsd log each (measured), ~3.6 MiB
RESETS = 9000


def test_a_guest_resetting_its_virtiofs_device_cannot_grow_the_virtiofsd_log(
    runtime, tmp_path
) -> None:
    # Container root mounts a sysfs of its own and unbinds/re-binds its virtio-fs device in
    # a loop; QEMU's C virtiofsd logs each queue stop/start (~400 bytes per reset, ~200 KB/s).
    vol = tmp_path / "vol"
    vol.mkdir()
    box = runtime.create(BoxOptions(image="busybox", name=unique("vfslog"), memory_mib=256,
                                    volumes=[f"{vol}:/mnt/v"], volume_sharer="virtiofs"))
    box.start()
    try:
        script = (
            "mkdir -p /tmp/s && mount -t sysfs sysfs /tmp/s && "
            "d=/tmp/s/bus/virtio/drivers/virtiofs && dev=$(ls $d | grep '^virtio') && "
            f"i=0; while [ $i -lt {RESETS} ]; do echo $dev > $d/unbind && echo $dev > $d/bind "
            "|| break; i=$((i+1)); done; echo resets=$i"
        )
        result = box.exec(["sh", "-c", script], timeout=1800)
        assert result.exit_code == 0 and f"resets={RESETS}".encode() in result.stdout, result
        assert box.exec(["echo", "alive"], timeout=120).stdout == b"alive\n"
        (log,) = box.dir.glob("virtiofsd-*.log")
        time.sleep(1)  # the daemon's writer copies asynchronously
        files = {p.name: p.stat().st_size for p in consolelog.log_files(log)}
        assert len(files) == 3, files  # rotated: the guest wrote more than one file holds
        assert all(size <= consolelog.DAEMON_LOG_MAX_BYTES for size in files.values()), files
        assert "fv_queue_set_started" in log.read_text()  # the newest lines are the daemon's
    finally:
        box.stop(timeout=10)
        runtime.remove(box.id, force=True)
