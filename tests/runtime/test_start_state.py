"""The Starting state: written before anything is spawned, naming the starter and the VMM, so
a start killed at any point leaves nothing running that a later process cannot find and stop.

The hypervisor is a double (``sleeper_double``: a real host process that sleeps, in its own
session, naming the box directory, like QEMU); the starter, the agent shim, the record, the
recovery and the process scans are real. The real-VM version is tests/vm/test_start_interrupted.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from boxlite_core.errors import GuestError, StateError
from boxlite_core.models import BoxStatus
from boxlite_core.runtime.records import identity_alive, process_identity
from boxlite_core.vmm.procstat import start_time
from boxlite_testing import waits
from boxlite_testing.orphans import naming
from boxlite_testing.runtime_doubles import make_runtime, opts

HERE = Path(__file__).resolve().parent
#: the process that runs a start, killed by the tests: the doubles' runtime on the test's home
CHILD = r"""
import sys
from pathlib import Path
from boxlite_testing import runtime_doubles
rt = runtime_doubles.make_runtime(Path(sys.argv[2]))
rt.get(sys.argv[3]).start()
"""
#: the ``boxlite`` command, run from this interpreter
BOXLITE = [sys.executable, "-c", "from boxlite_core.cli.main import main; main()"]
POLL_LIMIT = 60.0  # seconds; a bound on a wait for an event, not a timing


def wait_for(what: str, check, limit: float = POLL_LIMIT):
    return waits.wait_for(what, check, limit)


def start_in_child(tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, BOXLITE_BOOT_TIMEOUT="120")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(HERE), str(tmp_path), name],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def kill_during_guest_connect(rt, tmp_path: Path, name: str):
    """Start ``name`` in a child, SIGKILL it once the VM double and the real agent shim run
    (stage guest_connect): the moment that orphaned QEMU and the shim before."""
    box = rt.get(name)
    child = start_in_child(tmp_path, name)
    try:
        # both run only while the start waits for the guest (stage guest_connect)
        wait_for(
            "the VM double and the agent shim",
            lambda: child.poll() is None
            and any("boxlite_core.channel.shim" in t for _, t in naming(box.dir, box.id))
            and any("time.sleep" in t for _, t in naming(box.dir, box.id)),
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return box


@pytest.fixture
def cleanup_procs():
    """Whatever a failing test leaves naming its boxes is killed (never anything else)."""
    boxes: list[tuple[Path, str]] = []
    yield boxes
    for box_dir, box_id in boxes:
        for pid, _ in naming(box_dir, box_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- transitions and the starter's identity ------------------------------------------------


def test_every_start_passes_through_starting():
    S = BoxStatus
    for origin in (S.CONFIGURED, S.STOPPED, S.FAILED):
        assert origin.can_become(S.STARTING)
        assert not origin.can_become(S.RUNNING), f"{origin} must not skip starting"
    assert S.STARTING.can_become(S.RUNNING) and S.STARTING.can_become(S.FAILED)
    for other in (S.CONFIGURED, S.STOPPED, S.STOPPING, S.STARTING):
        assert not S.STARTING.can_become(other)
    assert not S.RUNNING.can_become(S.STARTING)
    assert S.STARTING.may_have_vm and not S.CONFIGURED.may_have_vm


def test_starter_identity_dead_pid_recycled_pid_and_live():
    me = process_identity()
    assert me["pid"] == os.getpid() and me["start_time"] == start_time(os.getpid())
    assert identity_alive(me)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = process_identity(sleeper.pid)
        assert identity_alive(live)
        # the same pid with another start time: a recycled pid, not the starter
        assert not identity_alive({**live, "start_time": live["start_time"] - 1})
        assert not identity_alive({"pid": sleeper.pid, "start_time": None})  # bare pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not identity_alive(live)  # dead (and reaped)
    assert not identity_alive(None) and not identity_alive({"pid": "x"})


def test_record_says_starting_with_starter_and_stage_before_launch(rt):
    """What a launching backend sees in the database: the state any other process reads."""
    box = rt.create(opts(name="seen"))
    seen = {}
    backend = rt.plugins.backend("launchfail_double")
    original = type(backend).launch

    def launch(self, plan):
        seen["record"] = rt.store.get(box.id)
        return original(self, plan)

    type(backend).launch = launch
    try:
        with pytest.raises(Exception, match="vmm_spawn"):
            box.start()
    finally:
        type(backend).launch = original
    during = seen["record"]
    assert during.status is BoxStatus.STARTING
    assert during.stage == "vmm_spawn"
    assert during.starter == process_identity()
    after = rt.store.get(box.id)
    assert after.status is BoxStatus.FAILED and after.stage == "vmm_spawn"
    assert not after.abandoned


# -- a starter killed mid-start ------------------------------------------------------------


def test_killed_starter_is_recovered_at_startup_double(tmp_path, rt, cleanup_procs):
    box = rt.create(opts(name="victim", backend="sleeper_double"))
    cleanup_procs.append((box.dir, box.id))
    kill_during_guest_connect(rt, tmp_path, "victim")
    record = rt.store.get(box.id)
    # what the user sees right after the kill: never Configured with a VM behind it
    assert record.status is BoxStatus.STARTING and record.abandoned
    assert record.stage == "guest_connect"
    left = naming(box.dir, box.id)
    assert record.vmm and record.vmm["pid"] in [pid for pid, _ in left], left
    rt2 = make_runtime(tmp_path)  # the next process on this home
    try:
        record = rt2.store.get(box.id)
        assert record.status is BoxStatus.FAILED, record
        assert "guest_connect: start abandoned" in record.error
        assert naming(box.dir, box.id) == []
    finally:
        rt2.close()


@pytest.mark.parametrize("action", ["rm -f", "stop", "kill", "start"])
def test_after_a_killed_starter_every_command_stops_what_the_box_dir_names_double(
    tmp_path, rt, cleanup_procs, monkeypatch, action
):
    box = rt.create(opts(name="victim", backend="sleeper_double"))
    cleanup_procs.append((box.dir, box.id))
    kill_during_guest_connect(rt, tmp_path, "victim")
    assert naming(box.dir, box.id), "the kill should have left the VM double and shim running"
    rt2 = make_runtime(tmp_path, recover=False)  # no startup recovery: the command must do it
    try:
        if action == "rm -f":
            rt2.remove("victim", force=True)
            assert rt2.store.find("victim") is None
        elif action == "stop":
            rt2.get("victim").stop()
        elif action == "kill":
            rt2.get("victim").kill()
        else:  # start again: the abandoned start is settled, then a fresh one runs
            monkeypatch.setenv("BOXLITE_BOOT_TIMEOUT", "1")
            with pytest.raises(GuestError, match="guest_connect"):
                rt2.get("victim").start()
        if action != "rm -f":
            record = rt2.store.get(box.id)
            assert record.status is BoxStatus.FAILED
            assert record.failures >= 1
        assert naming(box.dir, box.id) == []
    finally:
        rt2.close()


def test_start_waits_for_a_live_starter_and_ls_shows_starting(tmp_path, rt, cleanup_procs,
                                                              monkeypatch):
    box = rt.create(opts(name="busy", backend="sleeper_double"))
    cleanup_procs.append((box.dir, box.id))
    child = start_in_child(tmp_path, "busy")
    try:
        wait_for("the child's start at guest_connect",
                 lambda: rt.store.get(box.id).state.get("stage") == "guest_connect")
        record = rt.store.get(box.id)
        assert record.status is BoxStatus.STARTING and not record.abandoned
        # recovery in another process leaves a live start alone
        rt3 = make_runtime(tmp_path)
        assert rt3.store.get(box.id).status is BoxStatus.STARTING
        rt3.close()
        env = dict(os.environ, BOXLITE_HOME=str(tmp_path / "home"))
        out = subprocess.run([*BOXLITE, "ls"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert "starting (guest_connect)" in out.stdout, out.stdout + out.stderr
        shown = subprocess.run([*BOXLITE, "inspect", "busy"],
                               env=env, capture_output=True, text=True, timeout=60)
        info = json.loads(shown.stdout)
        assert info["status"] == "starting" and info["stage"] == "guest_connect"
        assert info["state"]["starter"]["pid"] == child.pid
        # a second start waits on the box lock instead of booting a second VM on the disk
        monkeypatch.setenv("BOXLITE_BOOT_TIMEOUT", "1")
        rt2 = make_runtime(tmp_path, recover=False)
        outcome: dict[str, BaseException | None] = {}

        def second() -> None:
            try:
                rt2.get("busy").start()
                outcome["error"] = None
            except BaseException as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive(), f"second start did not wait: {outcome}"
        first_vm = rt.store.get(box.id).vmm
        child.send_signal(signal.SIGKILL)
        child.wait()
        waiter.join(POLL_LIMIT)
        assert not waiter.is_alive()
        # it settled the abandoned start, stopped its VM, then ran its own (which times out)
        assert isinstance(outcome["error"], GuestError), outcome
        assert not identity_alive(first_vm)
        assert naming(box.dir, box.id) == []
        record = rt2.store.get(box.id)
        assert record.status is BoxStatus.FAILED and record.failures == 2
        rt2.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_live_starter_without_the_lock_is_refused_clearly(tmp_path, rt, monkeypatch):
    """A Starting record whose starter lives but holds no lock (only a damaged home gets
    there): start/stop/rm refuse, naming the process, instead of undoing its work."""
    monkeypatch.setattr("boxlite_core.runtime.lifecycle.STARTER_EXIT_GRACE", 0.1)
    box = rt.create(opts(name="odd"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rt.store.begin_start(box.id, process_identity(sleeper.pid))
        for act in (box.start, box.stop, lambda: rt.remove("odd", force=True)):
            with pytest.raises(StateError, match=f"starting in process {sleeper.pid}"):
                act()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert rt.store.get(box.id).abandoned
    box.stop()
    assert rt.store.get(box.id).status is BoxStatus.FAILED
