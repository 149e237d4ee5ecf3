"""Memory images without a VM: the helper QEMU's argv, the restore plan, the saved facts.

The VM tests (test_qemu_snapshot.py) make an image from a real save and restore two VMs
from it; these pin the argv rules a wrong edit would break silently (a helper that opens the
saving box's disks, or a restore that maps the image shared and writes the template).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, GuestHints, VmSpec
from boxlite_qemu.argv import STATE_INFO, QemuHost
from boxlite_qemu.backend import QemuBackend
from boxlite_qemu.memimage import (
    DEVICE_STATE,
    IGNORE_SHARED,
    RAM_IMAGE,
    default_ram_id,
    helper_argv,
    saved_memory_image,
    with_memory_image,
)

HOST = QemuHost(binary="/usr/bin/qemu-system-x86_64", arch="x86_64", accel="tcg", sandbox=True)

#: what a launched box records in vm.json (listeners passed as fds, a pidfile)
RECORDED = [
    "/usr/bin/qemu-system-x86_64", "-name", "boxlite-keen-newt", "-nodefaults",
    "-machine", "microvm,isa-serial=on", "-accel", "tcg", "-cpu", "qemu64,+arat",
    "-smp", "1", "-m", "512M", "-sandbox", "on,spawn=deny",
    "-chardev", "socket,id=console,fd=12,server=on,wait=on", "-serial", "chardev:console",
    "-chardev", "socket,id=qmp,fd=13,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
    "-pidfile", "/box/qemu.pid", "-kernel", "/kit/vmlinux",
    "-drive", "file=/kit/guest-root.ext4,format=raw,if=none,id=disk0,readonly=on,"
              "cache=writeback,discard=unmap",
    "-device", "virtio-blk-device,drive=disk0,serial=bxguest",
    "-drive", "file=/box/a,,b.qcow2,format=qcow2,if=none,id=disk1,readonly=off,"
              "cache=writeback",
    "-chardev", "socket,id=agent,fd=14,server=on,wait=off",
]


def plain_spec(box: Path, restore_from: Path) -> VmSpec:
    """A 256 MiB microvm restoring ``restore_from`` (plan only: no file needs to exist)."""
    return VmSpec(
        box_id=box.name, box_dir=box, cpus=1, memory_mib=256, kernel=Path("/kit/vmlinux"),
        initrd=Path("/kit/initrd.img"), cmdline="console=ttyS0", console_log=box / "console",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=(DiskSpec(box / "rootfs.qcow2", "qcow2", serial="bxroot"),),
        guest=GuestHints(machine="microvm"), restore_from=restore_from)


def test_helper_keeps_the_devices_but_touches_none_of_the_boxs_files(tmp_path: Path) -> None:
    argv = helper_argv(RECORDED, ram_id="microvm.ram", memory_mib=512,
                       image=tmp_path / "ram", sockets=tmp_path)
    assert "-pidfile" not in argv and argv[-2:] == ["-incoming", "defer"]
    assert argv[argv.index("-machine") + 1] == "microvm,isa-serial=on,memory-backend=microvm.ram"
    at = argv.index("-m")
    assert argv[at + 2:at + 4] == [
        "-object", f"memory-backend-file,id=microvm.ram,size=512M,mem-path={tmp_path}/ram,"
                   "share=on"]
    chardevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-chardev"]
    assert chardevs == [f"socket,id={name},path={tmp_path / name},server=on,wait=off"
                        for name in ("console", "qmp", "agent")]
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    # no file of the box is opened (its QEMU holds them); read-only and cache stay: they
    # shape the device features the saved state was negotiated with
    assert drives == [
        "driver=null-co,if=none,id=disk0,readonly=on,cache=writeback,discard=unmap",
        "driver=null-co,if=none,id=disk1,readonly=off,cache=writeback"]
    assert "-sandbox" in argv and "/kit/vmlinux" in argv  # the rest as recorded


def test_a_restore_maps_the_image_private(tmp_path: Path) -> None:
    state = tmp_path / "template"
    state.mkdir()
    (state / STATE_INFO).write_text(json.dumps({"memory_image": {
        "ram_image": RAM_IMAGE, "device_state": DEVICE_STATE, "ram_id": "microvm.ram",
        "memory_mib": 256}}))
    spec = plain_spec(tmp_path / "box", restore_from=state)
    plan = QemuBackend(HOST).plan(spec)
    argv = [str(a) for a in plan.data["argv"]]
    assert f"memory-backend-file,id=microvm.ram,size=256M,mem-path={state / RAM_IMAGE}," \
           "share=off" in argv  # share=on would write every guest page into the template
    assert argv[argv.index("-machine") + 1].endswith(",memory-backend=microvm.ram")
    assert plan.data["restore_state"] == str(state / DEVICE_STATE)
    assert plan.data["restore_capabilities"] == [IGNORE_SHARED]


@pytest.mark.parametrize("facts", [
    {},
    {"memory_image": "qemu-ram"},
    {"memory_image": {"ram_image": RAM_IMAGE, "device_state": "", "ram_id": "microvm.ram"}},
    {"memory_image": {"ram_image": RAM_IMAGE, "device_state": DEVICE_STATE}},
])
def test_a_state_without_complete_image_facts_restores_from_its_stream(
        tmp_path: Path, facts: dict) -> None:
    (tmp_path / STATE_INFO).write_text(json.dumps(facts))
    assert saved_memory_image(tmp_path) is None
    plan = QemuBackend(HOST).plan(plain_spec(tmp_path / "box", restore_from=tmp_path))
    assert "restore_capabilities" not in plan.data
    assert not any("memory-backend-file" in str(a) for a in plan.data["argv"])


def test_unreadable_facts_mean_no_image(tmp_path: Path) -> None:
    assert saved_memory_image(tmp_path) is None  # no qemu-state.json at all
    (tmp_path / STATE_INFO).write_text("{not json")
    assert saved_memory_image(tmp_path) is None


@pytest.mark.parametrize(("machine", "ram_id"), [
    ("microvm,isa-serial=on", "microvm.ram"), ("q35", "pc.ram"), ("pc-q35-7.2", "pc.ram"),
    ("pc-i440fx-7.2", "pc.ram"), ("virt", "mach-virt.ram"), ("isapc", None), ("", None)])
def test_the_ram_block_is_named_as_qemu_names_it(machine: str, ram_id: str | None) -> None:
    assert default_ram_id(machine) == ram_id


def test_a_vm_with_its_own_memory_backend_gets_no_image() -> None:
    argv = ["qemu", "-machine", "microvm,memory-backend=mem", "-m", "512M"]
    with pytest.raises(ValueError, match="already names a memory backend"):
        with_memory_image(argv, "microvm.ram", 512, "/x", shared=False)
    with pytest.raises(ValueError, match="without -machine or -m"):
        with_memory_image(["qemu", "-m", "1G"], "pc.ram", 1024, "/x", shared=False)
