"""A start killed at every stage of the init pipeline leaves nothing running that boxlite
cannot see and stop (issue 12, finding 4).

A subprocess runs the Python API (``Runtime(home).get(name).start()``) on a real box (QEMU
under TCG, virtiofsd for a volume, the agent shim) and is SIGKILLed at each stage; the CLI's
``boxlite run`` is killed during boot too. The kill point is found by polling the record and
/proc, or, for stages too quick to catch, by a progress callback in the child that blocks on a
FIFO nobody writes. After each kill:

- ``boxlite ls -a`` shows the box starting or failed, never configured with a VM behind it;
- a new Runtime() recovers it: Failed, and no process names the box directory or id;
- ``start`` boots it again and it runs a command;
- ``rm -f`` leaves no process that names the box directory or id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.tools import find_tool
from boxlite_testing import waits
from boxlite_testing.cli import boxlite_env
from boxlite_testing.homes import unique
from boxlite_testing.orphans import naming

pytestmark = pytest.mark.vm

#: the process that runs the start; blocks in its progress callback on ``block_on``
CHILD = r"""
import sys, time
from boxlite_core.runtime.runtime import Runtime
home, name, block_on, fifo = sys.argv[1:5]

def progress(message, fraction):
    if block_on and message == block_on:
        with open(fifo) as f:  # no writer ever comes: blocks until killed
            f.read()

Runtime(home).get(name).start(progress=progress)
print("started", flush=True)
time.sleep(600)
"""
BOXLITE = [sys.executable, "-c", "from boxlite_core.cli.main import main; main()"]
#: a bound on waiting for an event (a boot under a loaded TCG host), not a timing
LIMIT = float(os.environ.get("BOXLITE_BOOT_TIMEOUT") or 300)


def has(procs: list[tuple[int, str]], word: str) -> bool:
    return any(word in text for _, text in procs)


def wait_for(what: str, check, limit: float = LIMIT):
    return waits.wait_for(what, check, limit, interval=0.02)


def stage_of(home: Path, box_id: str) -> str | None:
    with Runtime(home, recover=False) as rt:
        return rt.store.get(box_id).state.get("stage")


def status_of(home: Path, box_id: str) -> str:
    with Runtime(home, recover=False) as rt:
        return rt.store.get(box_id).status.value


# (id, progress message the child blocks on, or None; what must exist before the kill)
KILL_POINTS = [
    ("filesystem_setup", "filesystem_setup", ()),
    ("container_rootfs_prep", "container_rootfs_prep", ()),
    ("volumes", "volumes", ()),
    ("vmm_spawn", "vmm_spawn", ("virtiofsd",)),
    ("qemu_just_spawned", None, ("qemu-system",)),
    ("guest_connect", "waiting for the guest agent", ("qemu-system", "virtiofsd")),
    ("shim_waiting_for_ready", None, ("qemu-system", "virtiofsd", "boxlite_core.channel.shim")),
    ("guest_init", "guest_init", ("qemu-system", "virtiofsd", "boxlite_core.channel.shim")),
]


@pytest.fixture
def vol(tmp_path):
    d = tmp_path / "vol"
    d.mkdir()
    (d / "mark").write_text("here\n")
    return d


@pytest.fixture
def tracked():
    """Boxes a failing test may leave processes for: killed at teardown (only those)."""
    boxes: list[tuple[Path, str, str]] = []
    yield boxes
    for box_dir, box_id, vol in boxes:
        for pid, _ in naming(box_dir, box_id, vol):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _sharer() -> str:
    if not find_tool("virtiofsd"):
        pytest.skip("virtiofsd not installed (apt-get install virtiofsd)")
    return "virtiofs"


def check_after_kill(home: Path, box_id: str, box_dir: Path, vol: Path, env: dict) -> None:
    """The four promises, in the order a user meets them."""
    # 1. ls -a (the CLI's own start-up recovery may already have settled it)
    listed = subprocess.run([*BOXLITE, "ls", "-a", "--json"], env=env, capture_output=True,
                            text=True, timeout=LIMIT)
    assert listed.returncode == 0, listed.stderr
    status = {r["id"]: r["status"] for r in json.loads(listed.stdout)}[box_id]
    assert status in ("starting", "failed"), f"ls -a shows the killed start as {status}"
    # 2. a new Runtime recovers it: failed, nothing left that names the box
    with Runtime(home) as rt:
        record = rt.store.get(box_id)
        assert record.status.value == "failed", record
        assert "abandoned" in (record.error or ""), record.error
    left = naming(box_dir, box_id, str(vol))
    assert left == [], f"processes left after recovery: {left}"
    # 3. start works again (no qcow2 lock held by an orphan), and the box runs a command
    with Runtime(home) as rt:
        box = rt.get(box_id)
        box.start()
        result = box.exec(["cat", "/mnt/v/mark"])
        assert result.stdout == b"here\n", result
        # 4. rm -f leaves no process naming the box
        rt.remove(box_id, force=True)
    left = naming(box_dir, box_id, str(vol))
    assert left == [], f"processes left after rm -f: {left}"
    shown = subprocess.run([*BOXLITE, "ls", "-a", "--json"], env=env, capture_output=True,
                           text=True, timeout=LIMIT)
    assert box_id not in shown.stdout


@pytest.mark.parametrize("point,block_on,expect", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_api_start_killed_at_every_stage(vm_home, vol, tmp_path, tracked, point, block_on,
                                         expect):
    sharer = _sharer()
    name = unique(f"kill-{point[:12]}")
    with Runtime(vm_home) as rt:
        box = rt.create(BoxOptions(image="busybox", name=name, memory_mib=256,
                                   volumes=[f"{vol}:/mnt/v"], volume_sharer=sharer))
        box_id, box_dir = box.id, box.dir
    tracked.append((box_dir, box_id, str(vol)))
    fifo = tmp_path / "block.fifo"
    os.mkfifo(fifo)
    env = boxlite_env(vm_home)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(vm_home), name, block_on or "",
                              str(fifo)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    held: list[int] = []
    try:
        def ready() -> bool:
            if child.poll() is not None:
                raise AssertionError(f"the start ended by itself: {child.stderr.read()!r}")
            if block_on is not None and not reached(fifo, held):
                return False
            return all(has(naming(box_dir, box_id, str(vol)), w) for w in expect)

        wait_for(f"kill point {point}", ready)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        for fd in held:
            os.close(fd)
    if expect:
        assert naming(box_dir, box_id, str(vol)), "the kill should leave the VM's processes running"
    check_after_kill(vm_home, box_id, box_dir, vol, env)


def reached(fifo: Path, held: list[int]) -> bool:
    """Has the child reached its block point? It opens the FIFO for reading there; a
    non-blocking open for writing succeeds only once a reader is waiting. The write end is
    held open, unwritten, so the child stays blocked in read() until it is killed."""
    if held:
        return True
    try:
        held.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader yet
        return False
    return True


def test_cli_run_killed_during_boot(vm_home, vol, tracked):
    sharer = _sharer()
    name = unique("kill-cli")
    env = boxlite_env(vm_home)
    cli = subprocess.Popen([*BOXLITE, "run", "--name", name, "--memory", "256", "-v",
                            f"{vol}:/mnt/v", "--sharer", sharer, "busybox", "--", "sleep", "600"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    box_id = box_dir = None
    try:
        def booting() -> bool:
            nonlocal box_id, box_dir
            if cli.poll() is not None:
                raise AssertionError(f"boxlite run ended by itself: {cli.stderr.read()!r}")
            if box_id is None:
                with Runtime(vm_home, recover=False) as rt:
                    record = rt.store.find(name)
                    if record is None:
                        return False
                    box_id, box_dir = record.id, rt.box_dir(record.id)
                    tracked.append((box_dir, box_id, str(vol)))
            # QEMU runs and the guest is not up yet: the agent shim is waiting for it
            return has(naming(box_dir, box_id, str(vol)), "qemu-system")

        wait_for("boxlite run to launch QEMU", booting)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait()
    assert box_id is not None and box_dir is not None
    assert naming(box_dir, box_id, str(vol)), "the kill should leave QEMU running"
    check_after_kill(vm_home, box_id, box_dir, vol, env)
