"""Real QEMU: boot the guest kit, drive it over QMP, stop, kill, attach from elsewhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_core.models import HostShare
from boxlite_core.vmm.procstat import alive
from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, VmSpec
from boxlite_qemu.backend import QemuBackend

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def kit():
    if not QemuBackend().probe().available:
        pytest.skip(f"qemu backend unavailable: {QemuBackend().probe().reason}")
    from boxlite_core.kit import ensure_kit

    home = Path(os.environ.get("BOXLITE_TEST_HOME", "/var/tmp/boxlite-test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return ensure_kit(home)


def kit_spec(kit, box: Path, *, extra_cmdline: str = "", shares=(), memory_mib: int = 256):
    from boxlite_core.kit import ROOT_SERIAL

    box.mkdir(parents=True, exist_ok=True)
    return VmSpec(
        box_id=box.name,
        box_dir=box,
        cpus=1,
        memory_mib=memory_mib,
        kernel=kit.kernel,
        initrd=kit.initrd,
        cmdline=f"{kit.cmdline} {extra_cmdline}".strip(),
        console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=(DiskSpec(kit.root_image, "raw", read_only=True, serial=ROOT_SERIAL),),
        shares=tuple(shares),
        guest=kit.guest_hints(),
    )


def read_ready(path: Path, timeout: float = 120.0) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"READY\n" not in buf:
            chunk = sock.recv(64)
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    return buf


def test_launch_qmp_stop_kill(kit, tmp_path: Path) -> None:
    backend = QemuBackend()
    box = tmp_path / "b1"
    handle = backend.launch(backend.plan(kit_spec(kit, box)))
    try:
        assert handle.is_running() and alive(handle.pid, handle.start_time)
        assert handle.status() == "running"
        state = json.loads((box / "vm.json").read_text())
        assert state["pid"] == handle.pid and state["start_time"] == handle.start_time
        assert state["argv"][0].startswith("/") and "qemu-system" in state["argv"][0]
        assert int((box / "qemu.pid").read_text()) == handle.pid
        for sock in ("qmp.sock", "agent.port"):
            assert (box / sock).stat().st_mode & 0o777 == 0o600

        # the agent's virtio-serial port reaches the guest: its READY line comes back
        assert b"READY\n" in read_ready(box / "agent.port")
        assert "boxlite-init: exec agent" in (box / "console.log").read_text()

        handle.pause()
        assert handle.status() == "paused"
        handle.resume()
        assert handle.status() == "running"

        # a fresh backend (as after a host restart) re-adopts it
        other = QemuBackend().attach(box)
        assert other is not None and other.pid == handle.pid and other.status() == "running"

        handle.stop(timeout=4)
        assert not handle.is_running() and not other.is_running()
        assert f"QEMU (pid {handle.pid}) exited with status 0" in handle.exit_reason()
        assert QemuBackend().attach(box) is None
        handle.stop()  # idempotent
    finally:
        handle.kill()

    handle = backend.launch(backend.plan(kit_spec(kit, box)))
    handle.kill()
    assert not handle.is_running()
    assert "signal 9" in handle.exit_reason()
    handle.kill()


def test_guest_poweroff_is_exit(kit, tmp_path: Path) -> None:
    backend = QemuBackend()
    handle = backend.launch(backend.plan(kit_spec(kit, tmp_path / "b2",
                                                  extra_cmdline="boxlite.init=marker")))
    assert handle.wait(120), "the marker guest should power off by itself"
    expected = f"guest powered off (QEMU (pid {handle.pid}) exited with status 0)"
    assert handle.exit_reason() == expected


def test_bad_argv_fails_with_qemu_stderr(kit, tmp_path: Path) -> None:
    backend = QemuBackend()
    spec = kit_spec(kit, tmp_path / "b3")
    plan = backend.plan(spec)
    broken = type(plan)(plan.backend, plan.spec,
                        {**plan.data, "argv": [*plan.data["argv"], "-device", "no-such-dev"]})
    with pytest.raises(EngineError, match="no-such-dev"):
        backend.launch(broken)


def test_virtiofs_and_9p_boot(kit, tmp_path: Path) -> None:
    """Both share kinds attach (QEMU connects to virtiofsd over vhost-user, memfd RAM)."""
    from boxlite_core.volumes.ninep import NinePSharer
    from boxlite_core.volumes.virtiofs import VirtiofsSharer

    if os.geteuid() != 0:
        pytest.skip("the C virtiofsd needs root")
    box = tmp_path / "b4"
    data = tmp_path / "data"
    data.mkdir()
    vfs = VirtiofsSharer()
    shares = vfs.start([HostShare("vfs0", data, True)], box)
    shares += NinePSharer().start([HostShare("np0", data, True)], box)
    backend = QemuBackend()
    try:
        handle = backend.launch(backend.plan(kit_spec(kit, box, shares=shares)))
        try:
            assert handle.status() == "running"
            assert b"READY\n" in read_ready(box / "agent.port")
        finally:
            handle.stop(timeout=4)
    finally:
        vfs.stop(box)


def test_survives_launcher_exit_and_attach(kit, tmp_path: Path) -> None:
    """A box launched by a process that exits keeps running; we attach, stop it."""
    box = tmp_path / "b5"
    spec = kit_spec(kit, box)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    code = """
import json, sys
from pathlib import Path
from boxlite_core.vmm.spec import AgentChannel, DiskSpec, GuestHints, VmSpec
from boxlite_qemu.backend import QemuBackend
d = json.loads(Path(sys.argv[1]).read_text())
spec = VmSpec(box_id=d["box_id"], box_dir=Path(d["box_dir"]), cpus=d["cpus"],
    memory_mib=d["memory_mib"], kernel=Path(d["kernel"]), initrd=Path(d["initrd"]),
    cmdline=d["cmdline"], console_log=Path(d["console_log"]),
    agent=AgentChannel(d["agent"]["kind"], Path(d["agent"]["socket"])),
    disks=tuple(DiskSpec(Path(x["path"]), x["format"], x["read_only"], x["serial"])
                for x in d["disks"]), guest=GuestHints(**d["guest"]))
b = QemuBackend()
print(b.launch(b.plan(spec)).pid)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.json")],
                         capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    handle = QemuBackend().attach(box)
    assert handle is not None and handle.pid == pid
    try:
        assert handle.status() == "running"
        time.sleep(0.2)
        assert handle.is_running()
        handle.stop(timeout=4)
        assert not handle.is_running()
        assert handle.exit_reason().startswith("stopped by boxlite")
    finally:
        handle.kill()
    assert QemuBackend().attach(box) is None
