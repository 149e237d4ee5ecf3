"""Fixtures for the hvf backend tests: a VmSpec with every kind of device, built in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from boxlite_core.models import AgentEndpoint, DiskSpec, ShareSpec, VmSpec

HERE = Path(__file__).parent
if str(HERE) not in sys.path:  # the framework doubles are imported by name (also by the runner)
    sys.path.insert(0, str(HERE))


def make_spec(box_dir: Path, **changes) -> VmSpec:
    fields = dict(
        box_id="b1",
        box_dir=box_dir,
        cpus=1,
        memory_mib=512,
        kernel=box_dir / "kit" / "Image",
        initrd=box_dir / "kit" / "initrd.cpio",
        cmdline="console=ttyS0 quiet loglevel=3 panic=-1 reboot=t",
        console_log=box_dir / "console.log",
        agent=AgentEndpoint(box_dir / "agent.sock", kind="stream"),
        disks=(
            DiskSpec(box_dir / "rootfs.qcow2", format="qcow2", serial="rootfs"),
            DiskSpec(box_dir / "guestroot.raw", format="raw", read_only=True, serial="guestroot"),
        ),
        shares=(
            ShareSpec("vol0", box_dir / "data", kind="virtiofs", read_only=False),
            ShareSpec("vol1", box_dir / "ro", kind="virtiofs", read_only=True),
        ),
    )
    fields.update(changes)
    return VmSpec(**fields)


@pytest.fixture
def spec(tmp_path: Path) -> VmSpec:
    return make_spec(tmp_path)
