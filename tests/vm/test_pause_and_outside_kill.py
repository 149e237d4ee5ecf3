"""One QEMU box: pause/resume as states `ls` shows, then its VM killed from outside.

One boot for both (VM tests are slow under TCG): the pause half checks the record says
``paused`` and an exec is refused naming `boxlite resume`; the kill half checks the error the
user gets, and what `boxlite inspect` shows afterwards, name the signal that killed the VM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from boxlite_core.errors import GuestError, StateError
from boxlite_core.models import BoxOptions, BoxStatus
from boxlite_testing.cli import boxlite_env
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm


def _cli(vm_home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", *args],
        env=boxlite_env(vm_home), capture_output=True, text=True, timeout=120,
    )


def test_pause_then_outside_sigkill_is_named(runtime, vm_home):
    if "qemu" not in runtime.plugins.backend_names() or not runtime.plugins.probe("qemu").available:
        pytest.skip("needs the qemu backend")
    box = runtime.create(BoxOptions(image="busybox", name=unique("pausekill"), memory_mib=256,
                                    backend="qemu"))
    try:
        box.start()
        assert box.exec(["echo", "up"]).stdout == b"up\n"

        box.pause()
        assert box.status is BoxStatus.PAUSED
        listed = _cli(vm_home, "ls")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if box.name in line)
        assert "paused" in row, listed.stdout
        with pytest.raises(StateError, match=rf"paused.*`boxlite resume {box.name}`"):
            box.exec(["echo", "no"])
        box.resume()
        assert box.exec(["echo", "again"]).stdout == b"again\n"

        pid = box.record.pid
        assert pid
        os.kill(pid, signal.SIGKILL)  # from outside: not through boxlite
        with pytest.raises(GuestError, match=r"killed by signal 9 \(SIGKILL\)") as caught:
            box.exec(["echo", "gone"], timeout=60)
        assert f"pid {pid}" in str(caught.value)
        record = box.record
        assert record.status is BoxStatus.FAILED
        assert "killed by signal 9 (SIGKILL)" in (record.error or "")
        shown = _cli(vm_home, "inspect", box.name)
        assert shown.returncode == 0, shown.stderr
        assert "killed by signal 9 (SIGKILL)" in json.dumps(json.loads(shown.stdout))
    finally:
        runtime.remove(box.id, force=True)
