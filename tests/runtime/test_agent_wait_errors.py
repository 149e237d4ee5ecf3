"""A start that never reaches the agent says why: how the VM died, or which setting bounded
the wait.

Found by a vendor writing a backend from the guide: QEMU refused a ``-device`` after its
chardev sockets existed, so the user saw only "the box's VM stopped before its guest agent
became ready (console log empty)" while QEMU's own message sat in a log ``--rm`` deleted.
The handle here is a real VMM-like process (``sh`` printing QEMU's error and exiting 1),
wrapped in the core's ProcessVmHandle the way a one-process backend does it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from boxlite_core.channel.port import dead_error, ready_timeout_error
from boxlite_core.errors import GuestError
from boxlite_core.runtime.pipeline import explain_agent_wait
from boxlite_core.vmm.process import ProcessVmHandle
from boxlite_core.vmm.procstat import start_time

QEMU_REFUSAL = "qemu-system-x86_64: -device no-such-device: 'no-such-device' is not a valid device"


class VmmProcess(ProcessVmHandle):
    """The shape of a vendor's handle: exit_reason quotes what the VMM printed."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(proc.pid, start_time(proc.pid), proc)
        self.proc = proc

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
        assert self.proc.stderr is not None
        said = self.proc.stderr.read().decode().strip()
        return f"VMM exited with status {self.proc.returncode}: {said}"


def test_a_vmm_that_dies_before_ready_is_quoted() -> None:
    proc = subprocess.Popen(["sh", "-c", f"echo \"{QEMU_REFUSAL}\" >&2; exit 1"],
                            stderr=subprocess.PIPE)
    handle = VmmProcess(proc)
    proc.wait(10)
    error = explain_agent_wait(
        dead_error("before its guest agent became ready", lambda: ""), handle, 120.0
    )
    assert isinstance(error, GuestError)
    text = str(error)
    assert QEMU_REFUSAL in text and "status 1" in text
    assert "before its guest agent became ready" in text


def test_a_running_vm_that_never_answered_names_the_setting() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        handle = VmmProcess(proc)
        error = explain_agent_wait(
            ready_timeout_error(Path("/box/agent.port"), lambda: ""),
            handle, 7.0,
        )
        assert "BOXLITE_BOOT_TIMEOUT" in str(error) and "waited 7 s" in str(error)
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_vm_without_a_reason_keeps_the_channel_error() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    handle = ProcessVmHandle(proc.pid, None, proc)
    original = dead_error("before its guest agent became ready", lambda: "")
    assert explain_agent_wait(original, handle, 120.0) is original
