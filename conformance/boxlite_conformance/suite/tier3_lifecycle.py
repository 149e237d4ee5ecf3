"""Tier 3: lifecycle faults. The VM dies under a running command; a box restarts with its
data; another process (the ``boxlite`` CLI) reattaches to a running box; pause and snapshot
where declared. Every test here owns its box, because each one breaks or stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from boxlite_core.errors import BoxliteError, GuestError
from boxlite_core.vmm.spec import Capability

from .. import guest_probe
from ..boxes import BoxPool
from ..markers import requires, tier
from ..requirements import Requirements

__all__ = ["TestPauseResume", "TestReattach", "TestRestart", "TestSnapshot", "TestVmDeath"]


def _box_id(box: Any) -> str:
    return str(getattr(box, "id", None) or box.info()["id"])


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
        pid = box.info().get("pid")
        assert pid, f"a running box reports no VM pid: {box.info()}"
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = box.exec(["sleep", "120"], timeout=300)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        time.sleep(2)  # the command is running in the guest
        os.kill(pid, signal.SIGKILL)
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
        os.kill(box.info()["pid"], signal.SIGKILL)
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


@tier(3)
@pytest.mark.vm
@requires(Capability.SNAPSHOT)
class TestSnapshot:
    def test_snapshot_restores_state(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        if not (hasattr(box, "snapshot") and hasattr(box, "restore")):
            pytest.skip(
                "capability 'snapshot' declared, but this boxlite runtime's Box has no "
                "snapshot()/restore() yet to drive it; nothing was tested"
            )
        guest_probe.run(box, ["sh", "-c", "echo before > /root/snap"])
        snap = box.snapshot()
        guest_probe.run(box, ["sh", "-c", "echo after > /root/snap"])
        box.restore(snap)
        assert guest_probe.run(box, ["cat", "/root/snap"]) == "before\n"
