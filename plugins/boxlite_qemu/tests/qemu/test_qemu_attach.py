"""attach(): identity is pid + start time, so a recycled pid is never taken for the VM.

A plain `sleep` process stands in for QEMU here (only its identity is used; no QMP).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from boxlite_core.vmm.procstat import alive, start_time
from boxlite_qemu.backend import QemuBackend


def write_vm_json(box: Path, pid: int, started: int | None) -> None:
    box.mkdir(parents=True, exist_ok=True)
    (box / "vm.json").write_text(json.dumps({
        "backend": "qemu", "pid": pid, "start_time": started,
        "qmp_socket": str(box / "qmp.sock"), "console_log": str(box / "console.log"),
    }))


def test_attach_checks_start_time(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        started = start_time(proc.pid)
        assert started is not None
        write_vm_json(tmp_path / "a", proc.pid, started)
        handle = QemuBackend().attach(tmp_path / "a")
        assert handle is not None and handle.pid == proc.pid and handle.is_running()

        write_vm_json(tmp_path / "b", proc.pid, started + 1)  # same pid, other process
        assert QemuBackend().attach(tmp_path / "b") is None

        handle.kill()
        assert not handle.is_running()
        assert "signal 9" in handle.exit_reason()
    finally:
        proc.kill()
        proc.wait()
    assert not alive(proc.pid, started)
    assert QemuBackend().attach(tmp_path / "a") is None


def test_attach_without_state_is_none(tmp_path: Path) -> None:
    assert QemuBackend().attach(tmp_path) is None
    (tmp_path / "vm.json").write_text("{not json")
    assert QemuBackend().attach(tmp_path) is None
    write_vm_json(tmp_path / "other", 1, None)
    data = json.loads((tmp_path / "other" / "vm.json").read_text())
    (tmp_path / "other" / "vm.json").write_text(json.dumps({**data, "backend": "libvirt"}))
    assert QemuBackend().attach(tmp_path / "other") is None
