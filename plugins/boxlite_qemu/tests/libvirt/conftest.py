"""Fixtures for the libvirt backend tests: specs, a reachable-daemon gate, the guest kit."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.kit import ROOT_SERIAL, GuestKit
from boxlite_core.vmm.spec import (
    AgentChannel,
    ChannelKind,
    DiskSpec,
    GuestHints,
    ShareSpec,
    VmSpec,
)


def make_spec(box_dir: Path, *, kernel: Path = Path("/k/vmlinux"),
              initrd: Path = Path("/k/initrd.img"), root_image: Path = Path("/k/root.ext4"),
              cmdline: str = "console=ttyS0 quiet", disks: tuple[DiskSpec, ...] = (),
              shares: tuple[ShareSpec, ...] = (), machine: str = "microvm",
              box_id: str = "b0x1d", memory_mib: int = 256, cpus: int = 1) -> VmSpec:
    return VmSpec(
        box_id=box_id, box_dir=box_dir, cpus=cpus, memory_mib=memory_mib,
        kernel=kernel, initrd=initrd, cmdline=cmdline,
        console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box_dir / "agent.port"),
        disks=(DiskSpec(root_image, "raw", read_only=True, serial=ROOT_SERIAL), *disks),
        shares=shares, guest=GuestHints(machine=machine),
    )


@pytest.fixture(name="make_spec")
def make_spec_fixture():
    """The spec builder, as a fixture (test folders are not packages here)."""
    return make_spec


@pytest.fixture
def libvirt_uri() -> str:
    """The daemon the VM tests use; skipped with the reason when it does not answer."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed: "
                                  "pip install 'boxlite-qemu[libvirt]'")
    from boxlite_qemu.libvirt_backend import default_uri

    uri = default_uri()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd not reachable at {uri} ({exc}); start it: virtlogd -d && "
                    "libvirtd -d (CI: scripts/start-services)")
    return uri


@pytest.fixture(scope="session")
def kit(built_kit: GuestKit) -> GuestKit:
    """The real guest kit (boxlite_testing.plugin: built once into the shared test home)."""
    return built_kit
