"""Tier 3: lifecycle faults. The VM dies under a running command; a box restarts with its
data; another process (the ``boxlite`` CLI) reattaches to a running box; pause where declared;
with ``snapshot``: snapshots, fork and boot templates through the runtime's API. Every test
here owns its boxes, because each one breaks, stops or forks them (TestSnapshot's tests share
one family of boxes; TestTemplateRestoredBox only reads the shared box T1 ran on).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from boxlite_core.errors import BoxliteError, GuestError
from boxlite_core.vmm.spec import Capability

from .. import guest_probe
from ..boxes import BoxPool, boot_record
from ..markers import requires, tier
from ..requirements import Requirements

__all__ = [
    "TestPauseResume",
    "TestReattach",
    "TestRestart",
    "TestSnapshot",
    "TestTemplateRestoredBox",
    "TestVmDeath",
]


def _box_id(box: Any) -> str:
    return str(getattr(box, "id", None) or box.info()["id"])


def _kill_vm_behind(box_pool: BoxPool, box: Any) -> None:
    """Kill the box's VM the way a crash or an admin would, without telling the runtime:
    SIGKILL to its VMM process; a VM on another machine (no pid here) is killed through a
    second handle of its backend (``virsh destroy`` for libvirt)."""
    info = box.info()
    if info.get("pid"):
        os.kill(int(info["pid"]), signal.SIGKILL)
        return
    host = (info.get("options") or {}).get("host")
    assert host, f"a running box on this machine reports no VM pid: {info}"
    backend = box_pool.runtime.plugins.backend(info["backend"], host)
    handle = backend.attach(box.dir)
    assert handle is not None, f"the backend does not find the running VM of {info['name']}"
    handle.kill()
    handle.release()


def _boxlite_cli() -> list[str]:
    exe = shutil.which("boxlite")
    return [exe] if exe else [sys.executable, "-m", "boxlite_core.cli.main"]


@tier(3)
@pytest.mark.vm
class TestVmDeath:
    def test_vm_killed_mid_exec(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = box.exec(["sleep", "120"], timeout=300)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        time.sleep(2)  # the command is running in the guest
        _kill_vm_behind(box_pool, box)
        worker.join(90)
        assert not worker.is_alive(), "exec still blocked 90 s after its VM was killed"
        assert isinstance(outcome.get("error"), GuestError), (
            f"exec in a killed VM must raise GuestError, got {outcome!r}"
        )
        info = box_pool.runtime.get(_box_id(box)).info()  # the record is kept
        assert info["status"] in ("failed", "stopped"), info
        assert info.get("error"), f"the box record does not say why it went down: {info}"

    def test_failed_box_can_start_again(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        _kill_vm_behind(box_pool, box)
        with pytest.raises(BoxliteError):
            box.exec(["true"], timeout=60)
        box.start()  # Failed/Stopped is retryable
        assert box.exec(["echo", "back"], timeout=60).stdout == b"back\n"


@tier(3)
@pytest.mark.vm
class TestRestart:
    def test_restart_keeps_data(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        guest_probe.run(box, ["sh", "-c", "echo survives > /root/keep && sync"])
        box.stop()
        box.start()
        assert guest_probe.run(box, ["cat", "/root/keep"]) == "survives\n"


@tier(3)
@pytest.mark.vm
class TestReattach:
    def test_cli_in_another_process_reaches_the_box(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        box_id = _box_id(box)
        env = {**os.environ, "BOXLITE_HOME": str(box_pool.home)}
        done = subprocess.run(
            [*_boxlite_cli(), "exec", box_id, "--", "sh", "-c", "echo from-cli; exit 3"],
            env=env, capture_output=True, timeout=180, check=False,
        )
        assert done.stdout == b"from-cli\n", done
        assert done.returncode == 3, f"boxlite exec did not pass the exit code through: {done}"
        stopped = subprocess.run(
            [*_boxlite_cli(), "stop", box_id],
            env=env, capture_output=True, timeout=180, check=False,
        )
        assert stopped.returncode == 0, stopped
        info = box_pool.runtime.get(box_id).info()
        assert info["status"] == "stopped", f"stopped by another process, but here: {info}"


@tier(3)
@pytest.mark.vm
@requires(Capability.PAUSE)
class TestPauseResume:
    #: how long a paused box must run nothing; the command in flight needs GUEST_WORK s of
    #: guest time, so with running vCPUs it would finish well inside this
    PAUSED_FOR = 3.0
    GUEST_WORK = 2

    def test_a_paused_box_runs_nothing_until_resumed(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        """A command already running in the guest when the box is paused must not finish
        until it is resumed (pause freezes the vCPUs), then finish normally. The command
        is started before the pause because the runtime refuses a new exec on a paused box
        (StateError naming `boxlite resume`)."""
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        if not hasattr(box, "pause"):
            pytest.skip(
                "capability 'pause' declared, but this boxlite runtime's Box has no pause() "
                "to drive it; nothing was tested"
            )
        guest_probe.run(box, ["sh", "-c", "echo kept > /root/paused; rm -f /root/started"])
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def exec_across_the_pause() -> None:
            try:
                outcome["result"] = box.exec(
                    ["sh", "-c", f"touch /root/started; sleep {self.GUEST_WORK}; "
                     "cat /root/paused"],
                    timeout=120,
                )
            except BaseException as exc:  # reported by the assertion below
                outcome["error"] = exc
            finally:
                finished.set()

        worker = threading.Thread(target=exec_across_the_pause, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while box.exec(["test", "-e", "/root/started"], timeout=60).exit_code != 0:
            assert time.monotonic() < deadline, "the command never started in the guest"
            assert not finished.is_set(), f"the command ended before it started: {outcome}"
        box.pause()
        try:
            ran = finished.wait(self.PAUSED_FOR)
        finally:
            box.resume()
        assert not ran, (
            f"an exec finished while the box was paused ({outcome}): pause() did not stop "
            "the guest's vCPUs"
        )
        assert finished.wait(120), "the exec running across the pause never finished"
        assert "error" not in outcome, f"the exec running across the pause failed: {outcome}"
        assert outcome["result"].stdout == b"kept\n", outcome["result"]
        assert box.exec(["echo", "resumed"], timeout=60).stdout == b"resumed\n"


#: what a snapshot must carry into the boxes made from it: a process (a counter loop writing
#: a line a second), files in tmpfs (/tmp and /dev/shm are tmpfs in the guest) written just
#: before the loop starts, and a file on the rootfs disk (DISK_FILE, written before them)
COUNTER_FILE = "/tmp/conformance-counter"
COUNTER = (
    "echo before > /tmp/conformance-before; echo in-memory > /dev/shm/conformance-shm; "
    f"while :; do date +%s >> {COUNTER_FILE}; sleep 1; done"
)
#: guest seconds the counter loop gets to write another line
COUNTING_WAIT = 20.0
DISK_FILE = "/root/conformance-on-disk"
#: how far a restored guest's clock may be from the host's (seconds)
CLOCK_SLACK = 2


def _wait_until(what: str, check: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"waited {limit:.0f} s for {what}"
        time.sleep(0.5)


def _counting(box: Any) -> bool:
    """Whether the counter loop runs in ``box``: its file grows within COUNTING_WAIT s."""
    before = guest_probe.line_count(box, COUNTER_FILE)
    deadline = time.monotonic() + COUNTING_WAIT
    while time.monotonic() < deadline:
        if guest_probe.line_count(box, COUNTER_FILE) > before:
            return True
        time.sleep(0.5)
    return False


class SnapshotFamily:
    """TestSnapshot's boxes, made on first use (after the capability gate) and removed when
    the class is done: the source box, its counter loop running since before the snapshot;
    the snapshot; two boxes created from it (``BoxOptions(snapshot=NAME)``). A part that
    failed is remembered: every test asking for it fails at once with the same error."""

    def __init__(self, pool: BoxPool, rootfs: str) -> None:
        self.pool = pool
        self.rootfs = rootfs
        self.snapshot_name = f"conformance-{secrets.token_hex(4)}"
        self.boxes: list[Any] = []
        self._made: dict[str, Any] = {}
        self._loop: Any = None

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._made:
            try:
                self._made[key] = make()
            except (Exception, pytest.skip.Exception) as exc:  # a skip is remembered too
                self._made[key] = exc
        made = self._made[key]
        if isinstance(made, BaseException):
            raise made
        return made

    def adopt(self, box: Any) -> Any:
        self.boxes.append(self.pool.adopt(box))
        return box

    def source(self) -> Any:
        return self._once("source", self._make_source)

    def _make_source(self) -> Any:
        box = self.pool.fresh(memory_mib=256, rootfs=self.rootfs)
        self.boxes.append(box)
        if not (hasattr(box, "snapshot") and hasattr(box, "exec_stream")):
            pytest.skip(
                "capability 'snapshot' declared, but this boxlite runtime's Box has no "
                "snapshot()/exec_stream() to drive it; nothing was tested"
            )
        guest_probe.run(box, ["sh", "-c", f"echo on-disk > {DISK_FILE} && sync"])
        self._loop = box.exec_stream(["sh", "-c", COUNTER])  # kept: it runs until removal
        _wait_until("the counter loop's first line",
                    lambda: guest_probe.line_count(box, COUNTER_FILE) > 0, 60)
        return box

    def copies(self) -> list[Any]:
        """The two boxes created from the source's snapshot, started."""
        return list(self._once("copies", self._make_copies))

    def _make_copies(self) -> list[Any]:
        self.pool.snapshot(self.source(), self.snapshot_name)
        copies = []
        for _ in range(2):
            copies.append(self.pool.fresh(snapshot=self.snapshot_name))
            self.boxes.append(copies[-1])
        return copies

    def close(self) -> None:
        for box in reversed(self.boxes):
            self.pool.discard(box)
        if "copies" in self._made:
            self.pool.remove_snapshot(self.snapshot_name)


@tier(3)
@pytest.mark.vm
@requires(Capability.SNAPSHOT)
@requires(Capability.QCOW2)
class TestSnapshot:
    """``box.snapshot(name)``, ``BoxOptions(snapshot=name)`` and ``box.fork()``, driven through
    the runtime: the core builds them on ``save_state``, ``restore_from`` and qcow2 overlays
    (``DiskSwitch``), hence the ``qcow2`` gate too. One source box, one snapshot and two boxes
    made from it serve the class (restores: ~1 s each under TCG)."""

    @pytest.fixture(scope="class")
    def family(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> Iterator[SnapshotFamily]:
        """Class-scoped, so it is made before the capability gate runs: it boots nothing
        until a test asks it for a box."""
        family = SnapshotFamily(box_pool, conformance_requirements.default_rootfs)
        yield family
        family.close()

    def test_a_process_started_before_the_snapshot_runs_on_in_each_copy(
        self, family: SnapshotFamily
    ) -> None:
        for index, copy in enumerate(family.copies(), 1):
            boot = boot_record(copy)
            assert boot.get("source") == "snapshot", (
                f"copy {index} of snapshot {family.snapshot_name} did not start from it: "
                f"state['boot'] = {boot}"
            )
            assert _counting(copy), (
                f"copy {index}: the counter loop started in the source before the snapshot "
                f"does not run in it ({COUNTER_FILE} stopped growing): the saved VM state "
                "did not carry the process"
            )
            assert guest_probe.run(copy, ["cat", DISK_FILE]) == "on-disk\n", (
                f"copy {index}: the source's disk content is not there")

    def test_the_source_runs_on_after_its_snapshot(self, family: SnapshotFamily) -> None:
        """A snapshot may pause the box for the save; then it goes on: its processes run,
        and it takes commands (the VMM may have restarted under it, e.g. libvirt's save)."""
        family.copies()  # the snapshot is taken
        source = family.source()
        assert source.info()["status"] == "running", source.info()
        assert source.exec(["echo", "still here"], timeout=60).stdout == b"still here\n", (
            "the source box takes no commands after its snapshot"
        )
        assert _counting(source), "the source's counter loop stopped after its snapshot"

    def test_tmpfs_content_survives(self, family: SnapshotFamily) -> None:
        for index, copy in enumerate(family.copies(), 1):
            for path, content in (("/dev/shm/conformance-shm", "in-memory\n"),
                                  ("/tmp/conformance-before", "before\n")):
                mount = guest_probe.mount_at(copy, path.rsplit("/", 1)[0])
                if mount.fstype != "tmpfs" and path.startswith("/tmp/"):
                    continue  # /tmp on the disk in this guest: the disk tests cover it
                assert mount.fstype == "tmpfs", f"copy {index}: {mount} is not tmpfs"
                assert guest_probe.run(copy, ["cat", path]) == content, (
                    f"copy {index}: a tmpfs file ({path}) written before the snapshot is "
                    "not there"
                )

    def test_each_copy_has_its_own_randomness_and_the_host_clock(
        self, family: SnapshotFamily
    ) -> None:
        """Boxes restored from one saved VM start with the same kernel RNG state and the
        clock of the instant it was saved; the core must give each new entropy and the
        host's time (its Init), or siblings share secrets."""
        one, two = family.copies()
        read = {who: guest_probe.random_bytes(box) for who, box in (("copy 1", one),
                                                                    ("copy 2", two))}
        assert len(set(read.values())) == len(read), (
            f"two boxes of one snapshot read the same /dev/urandom bytes: {read}; each "
            "restored box must get fresh RNG state"
        )
        for who, box in (("copy 1", one), ("copy 2", two)):
            before = time.time()
            guest = guest_probe.clock(box)  # whole seconds: the true time is below guest + 1
            after = time.time()
            assert guest + 1 >= before - CLOCK_SLACK and guest <= after + CLOCK_SLACK, (
                f"{who}: guest clock {guest} is more than {CLOCK_SLACK} s from the host's "
                f"({before:.1f}..{after:.1f}): a restored box must get the host's time"
            )

    def test_copies_diverge_on_disk_and_in_memory(self, family: SnapshotFamily) -> None:
        """What one copy writes (disk and tmpfs) neither the source nor its sibling sees, and
        what the source writes no copy sees. The sibling is restarted before it looks, so it
        reads its disk afresh rather than its page cache."""
        source, (one, two) = family.source(), family.copies()
        guest_probe.run(one, ["sh", "-c", "echo one > /root/conformance-mine && "
                                          "echo one > /dev/shm/conformance-mine && sync"])
        guest_probe.run(source, ["sh", "-c", "echo source > /root/conformance-src && sync"])
        for path in ("/root/conformance-mine", "/dev/shm/conformance-mine"):
            assert guest_probe.exists(one, path)
            assert not guest_probe.exists(source, path), (
                f"copy 1 wrote {path} and the source box sees it")
            assert not guest_probe.exists(two, path), f"copy 1 wrote {path} and copy 2 sees it"
        assert not guest_probe.exists(one, "/root/conformance-src"), (
            "the source wrote /root/conformance-src after the snapshot and copy 1 sees it")
        two.stop()
        two.start()
        assert not guest_probe.exists(two, "/root/conformance-mine"), (
            "after a restart copy 2 reads copy 1's file from its disk: the copies share a "
            "writable disk instead of each writing its own overlay on the snapshot"
        )
        assert not guest_probe.exists(two, "/root/conformance-src")
        assert guest_probe.run(two, ["cat", DISK_FILE]) == "on-disk\n", (
            "after a restart copy 2 lost the snapshot's disk content"
        )

    def test_fork_keeps_the_source_running_and_its_copy_runs(
        self, family: SnapshotFamily
    ) -> None:
        source = family.source()
        if not hasattr(source, "fork"):
            pytest.skip(
                "capability 'snapshot' declared, but this boxlite runtime's Box has no fork() "
                "to drive it; nothing was tested"
            )
        copies = [family.adopt(c) for c in source.fork(1)]
        assert len(copies) == 1, f"fork(1) made {len(copies)} boxes: {copies}"
        (copy,) = copies
        assert boot_record(copy).get("source") == "snapshot", boot_record(copy)
        assert _counting(copy), "the counter loop of the forked box does not run in its copy"
        assert source.info()["status"] == "running", source.info()
        assert _counting(source), "the source's counter loop stopped after fork()"
        assert guest_probe.run(copy, ["cat", DISK_FILE]) == "on-disk\n"
        assert guest_probe.run(copy, ["cat", "/tmp/conformance-before"]) == "before\n"


@tier(3)
@pytest.mark.vm
@requires(Capability.SNAPSHOT)
class TestTemplateRestoredBox:
    """For a backend declaring ``snapshot`` the shared box T1 runs on is restored from a boot
    template (the pool sees to it: see ``boxes.py``), so T1 passing there is T1 passing on a
    template-restored box. This checks that it was, and repeats a few T1 checks."""

    def test_the_shared_box_is_template_restored_and_runs_commands(self, box: Any) -> None:
        from boxlite_core.runtime.templates import env_disabled_reason

        boot = boot_record(box)
        if not boot:
            pytest.skip(
                "this boxlite runtime does not record where a box's VM came from "
                "(state['boot']); nothing was tested"
            )
        off = env_disabled_reason()
        if off:
            pytest.skip(f"boot templates are off in this run ({off}); nothing was tested")
        assert boot.get("source") == "template", (
            f"the shared box (the one T1 ran on) was not restored from a boot template: "
            f"state['boot'] = {boot}; a backend declaring 'snapshot' must restore what its "
            "save_state wrote (the reason says why the core booted the kernel instead)"
        )
        for code in (0, 1, 42):
            result = box.exec(["sh", "-c", f"exit {code}"], timeout=60)
            assert result.exit_code == code, f"asked for exit {code}, got {result!r}"
        data = bytes(range(256)) * 256  # 64 KiB, every byte value
        result = box.exec(["sh", "-c", "cat | md5sum"], input=data, timeout=120)
        assert result.exit_code == 0, result
        assert result.stdout.split()[0].decode() == hashlib.md5(data).hexdigest(), result
        result = box.exec(["sh", "-c", 'echo "$CONFORMANCE_VAR"; pwd'],
                          env={"CONFORMANCE_VAR": "restored"}, cwd="/tmp", timeout=60)
        assert result.stdout == b"restored\n/tmp\n", result
