"""Fixtures for the libvirt backend tests: specs, a reachable-daemon gate, the guest kit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxlite_core.kit import ROOT_SERIAL
from boxlite_core.models import AgentEndpoint, DiskSpec, ShareSpec, VmSpec

REPO = Path(__file__).resolve().parents[4]


def make_spec(box_dir: Path, *, kernel: Path = Path("/k/vmlinux"),
              initrd: Path = Path("/k/initrd.img"), root_image: Path = Path("/k/root.ext4"),
              cmdline: str = "console=ttyS0 quiet", disks: tuple[DiskSpec, ...] = (),
              shares: tuple[ShareSpec, ...] = (), machine: str = "microvm",
              box_id: str = "b0x1d", memory_mib: int = 256, cpus: int = 1) -> VmSpec:
    return VmSpec(
        box_id=box_id, box_dir=box_dir, cpus=cpus, memory_mib=memory_mib,
        kernel=kernel, initrd=initrd, cmdline=cmdline,
        console_log=box_dir / "console.log",
        agent=AgentEndpoint(box_dir / "agent.port"),
        disks=(DiskSpec(root_image, "raw", read_only=True, serial=ROOT_SERIAL), *disks),
        shares=shares, hints={"machine": machine},
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
def kit():
    """The real guest kit (built once into BOXLITE_TEST_HOME, shared with tests/kit)."""
    from boxlite_core.kit import ensure_kit

    home = Path(os.environ.get("BOXLITE_TEST_HOME", "/var/tmp/boxlite-test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return ensure_kit(home, source_root=REPO)
