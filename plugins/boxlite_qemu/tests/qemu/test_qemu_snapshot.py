"""Capability.SNAPSHOT on the qemu backend: save a running VM's state, restore new VMs from it.

The plan tests need no VM. The VM tests boot ONE source VM (cold, ~10 s under TCG) and restore
from its states (~1-2 s each, no kernel boot): a template taken before Init serves a VM with a
different image in the rootfs slot; a state taken after Init with a disk switch serves a clone
that sees the disk as it was at the save, while the source goes on writing a new overlay.
A save given up midway (timeout, Ctrl-C) is tried on the same source VM: it must cancel
QEMU's migration so the VM runs on and saves again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from boxlite_core.errors import ConfigError, EngineError, StateError, UnsupportedError
from boxlite_core.vmm.consolelog import writer_running
from boxlite_core.vmm.spec import (
    AgentChannel,
    Capability,
    ChannelKind,
    DiskSpec,
    DiskSwitch,
    GuestHints,
    ShareSpec,
    VmSpec,
)
from boxlite_qemu.argv import STATE_FILE, STATE_INFO, QemuHost
from boxlite_qemu.backend import QemuBackend
from boxlite_qemu.handle import QemuHandle
from boxlite_qemu.memimage import DEVICE_STATE, RAM_IMAGE
from boxlite_qemu.qmp import QmpTimeout

HOST = QemuHost(binary="/usr/bin/qemu-system-x86_64", arch="x86_64", accel="tcg", sandbox=True)
ROOT_SERIAL = "bxroot"
DISK_SIZE = "64M"


def plain_spec(box: Path, **kw) -> VmSpec:
    return VmSpec(
        box_id=box.name,
        box_dir=box,
        cpus=1,
        memory_mib=256,
        kernel=Path("/kit/vmlinux"),
        initrd=Path("/kit/initrd.img"),
        cmdline="console=ttyS0 quiet",
        console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=(
            DiskSpec(Path("/kit/guest-root.ext4"), "raw", read_only=True, serial="bxguest"),
            DiskSpec(box / "rootfs.qcow2", "qcow2", serial=ROOT_SERIAL),
        ),
        guest=GuestHints(machine="microvm", qemu_globals=("virtio-mmio.force-legacy=false",)),
        **kw,
    )


# -- no VM -------------------------------------------------------------------------------------


def test_capability_declared() -> None:
    assert Capability.SNAPSHOT in QemuBackend(HOST).capabilities()


def test_restore_plan_is_the_boot_plan_plus_incoming_defer(tmp_path: Path) -> None:
    backend = QemuBackend(HOST)
    spec = plain_spec(tmp_path / "box")
    boot = backend.plan(spec)
    restore = backend.plan(attrs.evolve(spec, restore_from=tmp_path / "state"))
    assert restore.data["argv"] == [*boot.data["argv"], "-incoming", "defer"]
    assert restore.data["restore_state"] == str(tmp_path / "state" / STATE_FILE)
    assert "restore_state" not in boot.data
    # save_state finds a disk's drive by its serial
    assert boot.data["drives"] == {"bxguest": "disk0", ROOT_SERIAL: "disk1"}
    assert {k: v for k, v in restore.data.items() if k not in ("argv", "restore_state")} == {
        k: v for k, v in boot.data.items() if k != "argv"
    }
    json.dumps(restore.to_dict())  # serialisable


def test_snapshot_compat_names_qemu_accel_machine_sandbox(tmp_path: Path) -> None:
    compat = QemuBackend(HOST).snapshot_compat(plain_spec(tmp_path / "box"))
    assert compat.startswith(f"qemu={HOST.binary} ")
    assert "accel=tcg;" in compat and "machine=microvm,isa-serial=on;" in compat
    assert compat.endswith("sandbox=on")
    unsandboxed = QemuBackend(attrs.evolve(HOST, sandbox=False))
    assert unsandboxed.snapshot_compat(plain_spec(tmp_path / "box")) != compat
    # the files behind the devices are not part of it: one template serves every box
    assert QemuBackend(HOST).snapshot_compat(plain_spec(tmp_path / "other")) == compat


def fake_qemu(path: Path, version: str = "9.9.9") -> Path:
    """A script answering ``--version`` and ``-help`` as a QEMU with -sandbox would."""
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\necho ' -sandbox'\n")
    path.chmod(0o755)
    return path


def test_snapshot_compat_changes_when_qemu_is_replaced_in_place(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path / "qemu-system-x86_64")
    backend = QemuBackend(attrs.evolve(HOST, binary=str(binary)))
    spec = plain_spec(tmp_path / "box")
    compat = backend.snapshot_compat(spec)
    st = binary.stat()
    assert compat.startswith(
        f"qemu={binary} 9.9.9 ({st.st_size} bytes, mtime {st.st_mtime_ns}); ")
    assert backend.snapshot_compat(spec) == compat
    # same path, same version string, another build (a distro rebuild): another key
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert backend.snapshot_compat(spec) != compat


def test_a_failed_version_probe_is_not_kept(tmp_path: Path, monkeypatch) -> None:
    from boxlite_qemu import backend as backend_mod

    binary = fake_qemu(tmp_path / "qemu-system-x86_64", "8.8.8")
    real_run = subprocess.run
    calls = []

    def slow_once(argv, **kw):
        calls.append(argv)
        if len(calls) == 1:
            raise subprocess.TimeoutExpired(argv, kw.get("timeout", 10))
        return real_run(argv, **kw)

    monkeypatch.setattr(backend_mod.subprocess, "run", slow_once)
    assert backend_mod._qemu_version(str(binary)) is None
    assert backend_mod._qemu_version(str(binary)) == ("8.8.8", True)
    probes = len(calls)
    assert backend_mod._qemu_version(str(binary)) == ("8.8.8", True)  # kept now
    assert len(calls) == probes

    # the backend's host facts: a failed probe gives no -sandbox this once, not for good
    answers = iter([None, ("8.8.8", True)])
    monkeypatch.setattr(backend_mod, "_qemu_version", lambda _binary: next(answers))
    backend = QemuBackend()
    failed = backend.facts
    if failed.binary is None:
        pytest.skip("no qemu-system binary on this host")
    assert (failed.version, failed.sandbox) == ("unknown", False)
    probed = backend.facts
    assert (probed.version, probed.sandbox) == ("8.8.8", True)
    assert backend.facts is probed  # kept: no third probe (next() would raise)


def test_virtiofs_cannot_be_saved_or_restored(tmp_path: Path) -> None:
    box = tmp_path / "box"
    share = ShareSpec("vfs0", tmp_path, "virtiofs", socket=box / "vfs0.sock")
    spec = plain_spec(box, shares=(share,))
    backend = QemuBackend(HOST)
    with pytest.raises(UnsupportedError, match=r"'vfs0' is virtiofs.*QEMU < 8\.2"):
        backend.snapshot_compat(spec)
    with pytest.raises(UnsupportedError, match=r"QEMU < 8\.2"):
        backend.plan(attrs.evolve(spec, restore_from=tmp_path / "state"))
    backend.plan(spec)  # a cold boot is fine


def test_save_state_of_a_gone_vm_is_a_state_error(tmp_path: Path) -> None:
    gone = QemuHandle(tmp_path, 2**22 + 7, None, tmp_path / "qmp.sock")
    with pytest.raises(StateError, match="not running"):
        gone.save_state(tmp_path)


def test_missing_state_file_fails_before_qemu_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    box = tmp_path / "box"
    backend = QemuBackend(HOST)
    plan = backend.plan(attrs.evolve(plain_spec(box), restore_from=state))
    expected = re.escape(f"state file {state / STATE_FILE} cannot be read")
    with pytest.raises(EngineError, match=expected):
        backend.launch(plan)
    assert not qemu_pids(box) and not writer_running(box)
    assert not (box / "vm.json").exists()


# -- real VMs ----------------------------------------------------------------------------------


def qemu_pids(box: Path) -> list[int]:
    """QEMU processes whose command line names this box directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and os.fsencode(box) in cmdline:
            found.append(int(entry.name))
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qcow2_from(root: Path, out: Path) -> Path:
    """An ext4 filesystem holding ``root``, as a qcow2 of :data:`DISK_SIZE`."""
    raw = out.with_suffix(".raw")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(raw), DISK_SIZE], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True)
    raw.unlink()
    return out


def overlay_on(backing: Path, out: Path) -> Path:
    """A qcow2 overlay over ``backing`` without opening it (QEMU may hold its write lock)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(backing),
                    "-F", "qcow2", str(out), DISK_SIZE], check=True)
    return out


@attrs.define
class Vm:
    """A launched VM with its agent client; ``close`` kills both and checks nothing stays."""

    spec: VmSpec
    handle: object
    client: object = None

    def connect(self, timeout: float = 120.0) -> object:
        from boxlite_core.channel.client import AgentClient

        self.client = AgentClient.connect(self.spec.box_dir, timeout=timeout,
                                          is_alive=self.handle.is_running,
                                          console_tail=self.handle.console_tail)
        return self.client

    def run(self, script: str) -> str:
        code, _sig, _to, out, err = self.client.run(["sh", "-c", script])
        assert code == 0, (script, out, err)
        return out.decode()

    def close(self) -> None:
        from boxlite_core.channel.shimctl import stop_shim

        if self.client is not None:
            self.client.close()
        stop_shim(self.spec.box_dir)
        self.handle.kill()
        assert not qemu_pids(self.spec.box_dir)


@pytest.fixture(scope="module")
def kit():
    if not QemuBackend().probe().available:
        pytest.skip(f"qemu backend unavailable: {QemuBackend().probe().reason}")
    from boxlite_core.kit import ensure_kit

    home = Path(os.environ.get("BOXLITE_TEST_HOME", "/var/tmp/boxlite-test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return ensure_kit(home)


@pytest.fixture(scope="module")
def work(tmp_path_factory, busybox_root: Path) -> Path:
    """Two container images of the same virtual size, /marker saying which, and a volume."""
    work = tmp_path_factory.mktemp("snap")
    for name in ("a", "b"):
        root = work / f"root-{name}"
        shutil.copytree(busybox_root, root, symlinks=True)
        (root / "marker").write_text(f"image {name}\n")
        qcow2_from(root, work / f"{name}.qcow2")
    (work / "vol").mkdir()
    (work / "vol" / "hello").write_text("from the host\n")
    return work


def vm_spec(kit, work: Path, box: Path, rootfs: Path, **kw) -> VmSpec:
    from boxlite_core.kit import ROOT_SERIAL as KIT_SERIAL

    box.mkdir(parents=True, exist_ok=True)
    return VmSpec(
        box_id=box.name,
        box_dir=box,
        cpus=1,
        memory_mib=256,
        kernel=kit.kernel,
        initrd=kit.initrd,
        cmdline=kit.cmdline,
        console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=(DiskSpec(kit.root_image, "raw", read_only=True, serial=KIT_SERIAL),
               DiskSpec(rootfs, "qcow2", serial=ROOT_SERIAL)),
        shares=(ShareSpec("vol0", work / "vol", "9p"),),
        guest=kit.guest_hints(),
        **kw,
    )


def launch(spec: VmSpec) -> Vm:
    backend = QemuBackend()
    return Vm(spec, backend.launch(backend.plan(spec)))


@pytest.fixture(scope="module")
def source(kit, work: Path) -> Iterator[Vm]:
    """The one cold-booted VM, its agent answering, not initialised yet."""
    box = work / "src"
    box.mkdir()
    rootfs = box / "rootfs.qcow2"
    shutil.copy(work / "a.qcow2", rootfs)
    vm = launch(vm_spec(kit, work, box, rootfs))
    try:
        vm.connect()
        yield vm
    finally:
        vm.close()


@pytest.fixture(scope="module")
def template(source: Vm, work: Path) -> Path:
    """A state saved after the agent answered, before Init (a boot template), with no host
    attached to the agent port: the saved agent waits to write READY, so a restored VM's
    first host gets it at once. (Saved while a host is attached, the restored guest learns
    that its host is gone only once it runs: a host connecting at that instant can miss
    READY; the disk-switch test below saves that way, as a fork of a busy box would.)"""
    from boxlite_core.channel.shimctl import stop_shim

    source.client.close()
    stop_shim(source.spec.box_dir)
    state = work / "template"
    state.mkdir()
    source.handle.save_state(state)
    source.connect(timeout=60)
    return state


@pytest.fixture(scope="module")
def image_template(source: Vm, work: Path) -> Path:
    """:func:`template`, saved as boot templates are (``restores_share_memory``): a memory
    image that restores map copy-on-write (boxlite_qemu.memimage)."""
    from boxlite_core.channel.shimctl import stop_shim

    source.client.close()
    stop_shim(source.spec.box_dir)
    state = work / "image-template"
    state.mkdir()
    source.handle.save_state(state, restores_share_memory=True)
    source.connect(timeout=60)
    return state


def restore(kit, work: Path, name: str, state: Path, rootfs: Path) -> Vm:
    return launch(vm_spec(kit, work, work / name, rootfs, restore_from=state))


def mapping_kib(pid: int, path: Path) -> dict[str, int]:
    """/proc/PID/smaps fields (KiB) summed over the mappings of ``path``."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and len(head) == 3 and head[2] == "kB":
            fields[head[0].rstrip(":")] = fields.get(head[0].rstrip(":"), 0) + int(head[1])
    return fields


@pytest.mark.vm
def test_memory_image_restores_share_the_template_memory(kit, work: Path, source: Vm,
                                                         image_template: Path) -> None:
    info = json.loads((image_template / STATE_INFO).read_text())
    image = info["memory_image"]
    assert image["ram_id"] == "microvm.ram" and image["memory_mib"] == 256
    assert not (image_template / STATE_FILE).exists()  # the stream became the image
    ram = image_template / RAM_IMAGE
    assert ram.stat().st_size == 256 << 20
    # sparse: the pages the guest never used are holes, not zeros on disk
    assert 1 << 20 < ram.stat().st_blocks * 512 < 200 << 20
    assert (image_template / DEVICE_STATE).stat().st_size < 4 << 20
    assert source.handle.status() == "running"
    clones: list[Vm] = []
    try:
        for name in ("image-a", "image-b"):
            box = work / name
            box.mkdir()
            rootfs = box / "rootfs.qcow2"
            shutil.copy(work / "b.qcow2", rootfs)
            clone = restore(kit, work, name, image_template, rootfs)
            clones.append(clone)
            restored = json.loads((box / "vm.json").read_text())
            assert restored["restored_from"] == str(image_template / DEVICE_STATE)
            clone.connect(timeout=60)
            clone.client.init({"disk": {"serial": ROOT_SERIAL, "fstype": "ext4"},
                               "hostname": name})
            assert clone.run("cat /marker") == "image b\n"
            assert clone.run(f"echo {name} > /tmp/own && hostname") == f"{name}\n"
        for clone in clones:
            # copy-on-write: what neither guest wrote is one copy, mapped by both QEMUs
            kib = mapping_kib(clone.handle.pid, ram)
            assert kib.get("Shared_Clean", 0) > 8 * 1024, kib
        # and each guest's writes stay its own (tmpfs lives in guest RAM)
        assert [c.run("cat /tmp/own") for c in clones] == ["image-a\n", "image-b\n"]
        # a VM restored from an image saves and restores as any other (a fork of it): its
        # stream carries its whole memory and asks for no x-ignore-shared
        snap = work / "image-a-snap"
        snap.mkdir()
        clones[0].handle.save_state(snap)
        assert "memory_image" not in json.loads((snap / STATE_INFO).read_text())
        box = work / "copy-of-a"
        box.mkdir()
        shutil.copy(work / "b.qcow2", box / "rootfs.qcow2")
        copy = restore(kit, work, "copy-of-a", snap, box / "rootfs.qcow2")
        clones.append(copy)
        copy.connect(timeout=60)
        assert copy.run("cat /tmp/own") == "image-a\n"
    finally:
        for clone in clones:
            clone.close()


@pytest.mark.vm
def test_a_memory_image_that_cannot_be_made_leaves_the_stream(work: Path, source: Vm,
                                                             caplog) -> None:
    """An unknown machine (no RAM block name to map the image under): the save succeeds with
    its stream, as a snapshot's would, and says why in the log."""
    record = source.spec.box_dir / "vm.json"
    original = record.read_text()
    launched = json.loads(original)
    launched["machine"] = "isapc"
    record.write_text(json.dumps(launched))
    state = work / "no-image"
    state.mkdir()
    try:
        source.handle.save_state(state, restores_share_memory=True)
    finally:
        record.write_text(original)
    assert {p.name for p in state.iterdir()} == {STATE_FILE, STATE_INFO}
    assert "memory_image" not in json.loads((state / STATE_INFO).read_text())
    assert "no memory image for machine 'isapc'" in caplog.text
    assert source.handle.status() == "running"
    assert source.client.ping()["initialized"] is False


@pytest.mark.vm
def test_template_restores_with_another_image(kit, work: Path, source: Vm,
                                              template: Path) -> None:
    info = json.loads((template / STATE_INFO).read_text())
    assert info["state_file"] == STATE_FILE and info["memory_bytes"] == 256 << 20
    assert info["qemu_version"]["major"] >= 7
    assert info["stream_bytes"] == (template / STATE_FILE).stat().st_size > 1 << 20
    assert (template / STATE_FILE).stat().st_mode & 0o777 == 0o600
    # the source runs on (resume=True) and its agent still answers
    assert source.handle.status() == "running"
    assert source.client.ping()["initialized"] is False

    box = work / "clone-b"
    box.mkdir()
    rootfs = box / "rootfs.qcow2"
    shutil.copy(work / "b.qcow2", rootfs)
    clone = restore(kit, work, "clone-b", template, rootfs)
    try:
        assert clone.handle.status() == "running"
        state = json.loads((box / "vm.json").read_text())
        assert state["restored_from"] == str(template / STATE_FILE)
        assert state["drives"] == {"bxguest": "disk0", ROOT_SERIAL: "disk1"}
        attached = QemuBackend().attach(box)  # another process could switch its disks
        assert attached is not None and attached.drives == state["drives"]
        clone.connect(timeout=60)
        assert clone.client.ping()["initialized"] is False
        # Init mounts the clone's own disk: the image in the slot now, not the template's
        clone.client.init({"disk": {"serial": ROOT_SERIAL, "fstype": "ext4"},
                           "volumes": [{"tag": "vol0", "fstype": "9p", "guest_path": "/vol"}],
                           "hostname": "clone-b"})
        assert clone.run("cat /marker") == "image b\n"
        assert clone.run("cat /vol/hello") == "from the host\n"
        # a mounted 9p share blocks QEMU's migration: refused, naming the share; VM runs on
        refused = work / "refused"
        refused.mkdir()
        with pytest.raises(UnsupportedError, match=r"(?s)Migration is disabled.*'vol0'"):
            clone.handle.save_state(refused)
        assert clone.handle.status() == "running"
        assert clone.run("echo ok") == "ok\n"
    finally:
        clone.close()
    assert not writer_running(box)


@pytest.mark.vm
def test_disk_switch_freezes_the_disk_and_a_clone_continues(kit, work: Path, source: Vm,
                                                            template: Path) -> None:
    src = source.spec.disks[1].path
    with pytest.raises(ConfigError, match="serial 'nope': this VM has no such disk"):
        source.handle.save_state(work, switch_disks=[DiskSwitch("nope", src, src)])
    source.client.init({"disk": {"serial": ROOT_SERIAL, "fstype": "ext4"}, "hostname": "src"})
    source.run("echo before > /before && sync")

    # what the core does before the save: keep the disk's content under another name, and
    # create the overlay the VM goes on writing
    frozen = work / "frozen.qcow2"
    os.link(src, frozen)
    overlay = overlay_on(frozen, work / "src" / "rootfs.next.qcow2")
    state = work / "snap"
    state.mkdir()
    source.handle.save_state(state, switch_disks=[DiskSwitch(ROOT_SERIAL, src, overlay)])

    assert not overlay.exists() and src.exists()
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(src)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(frozen)
    digest = sha256(frozen)
    # the source runs on, writing the new overlay only
    assert source.run("echo after > /after && sync && cat /before /after") == "before\nafter\n"
    assert sha256(frozen) == digest

    # a clone from the snapshot, on its own overlay over the frozen disk: the disk as it was
    box = work / "clone-snap"
    box.mkdir()
    clone = restore(kit, work, "clone-snap", state, overlay_on(frozen, box / "rootfs.qcow2"))
    try:
        clone.connect(timeout=60)
        assert clone.client.ping()["initialized"] is True
        assert clone.run("cat /before; ls /after 2>&1 || true").startswith("before\n")
        assert "No such file" in clone.run("ls /after 2>&1 || true")
        clone.run("echo clone > /before && sync")
        assert source.run("cat /before") == "before\n"
        # resume=False leaves it paused; saved again (QEMU refuses a plain second migration
        # of a migrated VM) it stays paused, and runs on when resumed
        paused = work / "paused"
        paused.mkdir()
        clone.handle.save_state(paused, resume=False)
        assert clone.handle.status() == "postmigrate"
        again = work / "again"
        again.mkdir()
        clone.handle.save_state(again)
        assert clone.handle.status() == "postmigrate"
        assert (again / STATE_FILE).stat().st_size > 1 << 20
        clone.handle.resume()
        assert clone.run("cat /before") == "clone\n"
    finally:
        clone.close()
    assert sha256(frozen) == digest

    # again (a fork of a fork): the overlay QEMU got under another name freezes in turn, and
    # a clone opens that chain while the source still holds it
    frozen2 = work / "frozen2.qcow2"
    os.link(src, frozen2)
    state2 = work / "snap2"
    state2.mkdir()
    overlay2 = overlay_on(frozen2, work / "src" / "rootfs.next.qcow2")
    source.handle.save_state(state2, switch_disks=[DiskSwitch(ROOT_SERIAL, src, overlay2)])
    source.run("echo third > /third && sync")
    box = work / "clone-snap2"
    box.mkdir()
    clone = restore(kit, work, "clone-snap2", state2, overlay_on(frozen2, box / "rootfs.qcow2"))
    try:
        clone.connect(timeout=60)
        assert clone.run("cat /before /after; ls /third 2>&1 || true").startswith(
            "before\nafter\n")
        assert "No such file" in clone.run("ls /third 2>&1 || true")
    finally:
        clone.close()
    assert source.run("cat /third") == "third\n"
    assert sha256(frozen) == digest


@pytest.mark.vm
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_state_fails_and_leaves_nothing(kit, work: Path, template: Path,
                                                damage: str) -> None:
    state = work / f"state-{damage}"
    state.mkdir()
    if damage == "truncated":
        with open(template / STATE_FILE, "rb") as src:
            (state / STATE_FILE).write_bytes(src.read(4 << 20))
    else:
        (state / STATE_FILE).write_bytes(os.urandom(1 << 20))
    box = work / f"bad-{damage}"
    box.mkdir()
    rootfs = overlay_on(work / "a.qcow2", box / "rootfs.qcow2")
    backend = QemuBackend()
    plan = backend.plan(vm_spec(kit, work, box, rootfs, restore_from=state))
    expected = re.escape(f"loading the saved VM state {state / STATE_FILE}")
    with pytest.raises(EngineError, match=expected):
        backend.launch(plan)
    assert not qemu_pids(box)
    assert not writer_running(box)


@pytest.mark.vm
@pytest.mark.parametrize("interrupt", ["timeout", "ctrl-c"])
def test_a_save_that_fails_midway_is_cancelled_and_the_vm_runs_on(
        work: Path, source: Vm, monkeypatch, interrupt: str) -> None:
    """A save given up while QEMU migrates must cancel the migration: left to run on it
    completes, QEMU stops the VM for good ("postmigrate") and the next save is refused
    ("migration already running")."""
    from boxlite_qemu import handle as handle_mod

    # 1 MB/s: the ~100 MiB stream cannot finish while the save waits for it
    monkeypatch.setattr(handle_mod, "MIGRATION_MAX_BANDWIDTH", 1_000_000)
    if interrupt == "timeout":
        monkeypatch.setattr(handle_mod, "migration_bound", lambda _size: 1.0)
        expected: type[BaseException] = QmpTimeout
    else:
        real = handle_mod.migration_finished
        began = time.monotonic()
        sent: list[bool] = []

        def ctrl_c(what: str, answer: object) -> bool:
            """One SIGINT lands in the waiting main thread a second into the migration."""
            if time.monotonic() - began > 1.0 and not sent:
                sent.append(True)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return real(what, answer)

        monkeypatch.setattr(handle_mod, "migration_finished", ctrl_c)
        expected = KeyboardInterrupt
    failed = work / f"failed-{interrupt}"
    failed.mkdir()
    # Python's own SIGINT handler, whatever this run inherited: in one CI-style run (a
    # background job, started with SIGINT ignored) the handler here was SIG_IGN and the
    # signal did nothing; which code left it so then is not pinned down
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(expected):
            source.handle.save_state(failed)
    finally:
        signal.signal(signal.SIGINT, before)
    assert source.handle.qmp("query-migrate")["status"] == "cancelled"
    assert source.handle.status() == "running"
    assert not (failed / STATE_FILE).exists()
    assert "initialized" in source.client.ping()  # the guest answers

    monkeypatch.undo()
    again = work / f"after-{interrupt}"
    again.mkdir()
    source.handle.save_state(again)
    assert source.handle.status() == "running"
    assert (again / STATE_FILE).stat().st_size > 1 << 20
    assert "initialized" in source.client.ping()  # the guest answers
