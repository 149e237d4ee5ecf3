"""The VmSpec the hvf tests plan and launch: every kind of device, built under a box dir.

A module (not the conftest) because a launcher script run in a subprocess imports it too,
by name: the test module puts this folder on PYTHONPATH for the runner.
"""

from __future__ import annotations

from pathlib import Path

from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, ShareSpec, VmSpec


def make_spec(box_dir: Path, *, vsock_port: int = 1024, **changes) -> VmSpec:
    """A spec as the core builds it for a vsock channel on ``vsock_port`` (cmdline key too)."""
    fields = dict(
        box_id="b1",
        box_dir=box_dir,
        cpus=1,
        memory_mib=512,
        kernel=box_dir / "kit" / "Image",
        initrd=box_dir / "kit" / "initrd.cpio",
        # as the core builds it for a vsock channel: the agent's port key appended
        cmdline="console=ttyS0 quiet loglevel=3 panic=-1 reboot=t "
        f"boxlite.agent_vsock={vsock_port}",
        console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VSOCK, box_dir / "agent.sock", vsock_port=vsock_port),
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
