"""virtiofsd's log is capped and rotated: a guest can make the daemon log at will.

Measured (notes/console-log.md): a root guest unbinding and re-binding its virtio-fs device in
a loop (sysfs mounted in a container exec) makes QEMU's C virtiofsd log ~400 bytes per reset,
~200 KB/s, into BOXDIR/virtiofsd-TAG.log. These tests run the real sharer and the real
virtiofsd; the flood is written into the daemon's own stdout/stderr (``/proc/PID/fd/2``, as
root), which is exactly where the daemon's lines go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from boxlite_core import tools
from boxlite_core.models import HostShare
from boxlite_core.vmm.procstat import alive
from boxlite_core.volumes.virtiofs import VirtiofsSharer
from boxlite_testing.orphans import command_lines

VIRTIOFSD = tools.find_tool("virtiofsd")
pytestmark = pytest.mark.skipif(
    VIRTIOFSD is None or os.geteuid() != 0, reason="needs virtiofsd and root"
)
#: the daemon log cap (boxlite_core.vmm.consolelog.DAEMON_LOG_MAX_BYTES)
CAP = 1024 * 1024


def _sizes(log: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(log.parent.glob(log.name + "*"))}


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_virtiofsd_log_flood_stays_under_the_cap(tmp_path: Path) -> None:
    box, share = tmp_path / "box", tmp_path / "share"
    box.mkdir()
    share.mkdir()
    sharer = VirtiofsSharer()
    sharer.start([HostShare("vol0", share, False)], box)
    log = box / "virtiofsd-vol0.log"
    try:
        (record,) = sharer.read_state(box)
        line = b"fv_queue_set_started: qidx=0 started=1 (a guest-forced device reset)\n"
        flood = line * (6 * 1024 * 1024 // len(line))  # 6 MiB of daemon log lines
        with open(f"/proc/{record['pid']}/fd/2", "ab") as daemon_stderr:
            daemon_stderr.write(flood)
            daemon_stderr.write(b"the newest line\n")
        # the writer copies asynchronously: wait until the newest line has landed
        assert _wait(lambda: log.read_bytes().endswith(b"the newest line\n")), _sizes(log)
        sizes = _sizes(log)
        assert set(sizes) == {log.name, log.name + ".1", log.name + ".2"}, sizes
        assert all(size <= CAP for size in sizes.values()), sizes
        assert (log.parent / (log.name + ".1")).read_bytes().endswith(line)  # whole lines
        assert alive(record["pid"], record["start_time"])  # the daemon never waited on us
    finally:
        sharer.stop(box)
    # the writer ends by itself once the daemon is gone: no process names the log any more
    assert _wait(lambda: not _writers_of(log)), _writers_of(log)


def _writers_of(log: Path) -> list[int]:
    return [pid for pid, argv in command_lines()
            if str(log).encode() in argv and alive(pid, None)]
