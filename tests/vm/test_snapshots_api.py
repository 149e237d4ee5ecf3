"""Snapshots and fork through the Python API, with real QEMU.

One source box runs a counter loop (a process started before the snapshot) and keeps
tmpfs content; the boxes created from its snapshot must show both still there, diverge on
disk from the source and from each other, and each get their own RNG state, the host's clock
and their own hostname. Removal rules: a snapshot stays while a box's disk is an overlay on
it; a fork's snapshot goes with the last box on it.
"""

from __future__ import annotations

import time

import pytest

from boxlite_core.channel import shimctl
from boxlite_core.errors import StateError, UnsupportedError
from boxlite_core.models import BoxOptions
from boxlite_testing.homes import unique
from boxlite_testing.waits import wait_for

pytestmark = pytest.mark.vm

COUNTER = ("echo before > /tmp/f; echo shm > /dev/shm/s; "
           "while :; do date +%s >> /tmp/c; sleep 1; done")


@pytest.fixture(autouse=True)
def _qemu(runtime):
    if "qemu" not in runtime.plugins.backend_names() or not runtime.plugins.probe("qemu").available:
        pytest.skip("needs the qemu backend")


def _lines(box, path: str) -> int:
    result = box.exec(["sh", "-c", f"wc -l < {path}"])
    assert result.ok, result.stderr
    return int(result.stdout)


def _counting(box) -> bool:
    """The counter loop runs in ``box``: its file grows."""
    before = _lines(box, "/tmp/c")
    return bool(wait_for("the counter file to grow", lambda: _lines(box, "/tmp/c") > before,
                         15, 0.5))


def _out(box, *args: str) -> str:
    result = box.exec(list(args))
    assert result.ok, result.stderr
    return result.stdout.decode().strip()


def test_snapshot_then_create_continues_processes_and_diverges(runtime):
    source = runtime.create(BoxOptions(image="busybox", name=unique("snapsrc"), backend="qemu"))
    made: list = []
    snap_name = unique("snap")
    try:
        source.start()
        loop = source.exec_stream(["sh", "-c", COUNTER])
        wait_for("the counter to start", lambda: source.exec(["test", "-s", "/tmp/c"]).ok, 30)
        snap = source.snapshot(snap_name)
        assert snap.complete and snap.box_name == source.name
        assert [s.name for s in runtime.snapshots()].count(snap_name) == 1
        assert _counting(source)  # the source went on

        for _ in range(2):
            clone = runtime.create(BoxOptions(snapshot=snap_name))
            made.append(clone)
            clone.start()
            assert clone.record.state["boot"]["source"] == "snapshot"
        a, b = made
        for clone in made:
            assert _counting(clone)  # the process started before the snapshot runs on
            assert _out(clone, "cat", "/tmp/f") == "before"
            assert _out(clone, "cat", "/dev/shm/s") == "shm"  # tmpfs: memory, saved too
            assert _out(clone, "hostname") == clone.name
            assert abs(int(_out(clone, "date", "+%s")) - time.time()) < 2
        assert _out(a, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1") != \
            _out(b, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1")

        # disks diverge: each writes its own overlay
        a.exec(["sh", "-c", "echo a > /mine && sync"])
        source.exec(["sh", "-c", "echo src > /src && sync"])
        assert not b.exec(["test", "-e", "/mine"]).ok
        assert not source.exec(["test", "-e", "/mine"]).ok
        assert not a.exec(["test", "-e", "/src"]).ok
        # and survive a restart (the clone's disk chain: own overlay → snapshot → image)
        a.stop()
        a.start()
        assert a.record.state["boot"]["source"] != "snapshot"
        assert _out(a, "cat", "/mine") == "a"

        with pytest.raises(StateError, match=rf"box\(es\) .*{a.name}"):
            runtime.remove_snapshot(snap_name)
        loop.kill()
    finally:
        for box in [*made, source]:
            runtime.remove(box.id, force=True)
    runtime.remove_snapshot(snap_name)  # nothing uses it now
    assert snap_name not in [s.name for s in runtime.snapshots()]


def test_fork_makes_running_copies_and_its_snapshot_goes_with_the_last_box(runtime):
    source = runtime.create(BoxOptions(image="busybox", name=unique("forksrc"), backend="qemu"))
    copies: list = []
    try:
        source.start()
        source.exec_stream(["sh", "-c", COUNTER])
        wait_for("the counter to start", lambda: source.exec(["test", "-s", "/tmp/c"]).ok, 30)
        base = unique("copy")
        # a standby shim waiting (shimctl.warm_shim): no copy may take it. Attached within
        # ms of the copy's cont, the guest missed its saved host leaving, served the dead
        # session and said READY only at the shim's 2 s re-attach (fork 3.5 s, not 0.8)
        shimctl.warm_shim()
        standby = shimctl._standby
        copies = source.fork(2, name=base)
        assert [c.name for c in copies] == [f"{base}-1", f"{base}-2"]
        assert all(_counting(c) for c in copies)
        assert _counting(source)
        assert standby is not None and shimctl._standby is standby, "a copy took the standby"
        for copy in copies:
            assert "no READY within" not in (copy.dir / shimctl.SHIM_LOG).read_text()
        fork_snaps = [s for s in runtime.snapshots() if s.auto and s.box_name == source.name]
        assert len(fork_snaps) == 1
    finally:
        for box in [*copies, source]:
            runtime.remove(box.id, force=True)
    assert not [s for s in runtime.snapshots() if s.auto and s.box_name == source.name]


def test_snapshot_of_a_box_with_volumes_is_refused(runtime, tmp_path):
    (tmp_path / "vol").mkdir()
    box = runtime.create(BoxOptions(image="busybox", name=unique("snapvol"), backend="qemu",
                                    volumes=[f"{tmp_path / 'vol'}:/data"], volume_sharer="9p"))
    try:
        box.start()
        with pytest.raises(UnsupportedError, match="volumes"):
            box.snapshot(unique("nosnap"))
        assert box.exec(["echo", "still"]).stdout == b"still\n"
    finally:
        runtime.remove(box.id, force=True)
