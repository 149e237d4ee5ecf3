"""Synthetic VmSpecs for tier-0 plan checks: real paths in a temp dir, nothing booted.

Every field is set from arguments, so two calls with the same arguments build equal but
distinct specs — the determinism check compares plans of those, not of one shared object.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from boxlite_core.vmm.spec import (
    AgentChannel,
    Capability,
    ChannelKind,
    DiskSpec,
    Handshake,
    ShareSpec,
    VmSpec,
)

#: share kinds the core knows; a plan for a kind the backend does not declare must be refused
KNOWN_SHARE_KINDS: dict[str, Capability] = {
    "9p": Capability.NINEP,
    "virtiofs": Capability.VIRTIOFS,
}
#: a kind no backend can know: plan() must refuse it with ConfigError
BOGUS_SHARE_KIND = "conformance-bogus-fs"


def disk_format_for(capabilities: frozenset[Capability]) -> str | None:
    """A disk format the backend declares, or None (then the spec carries no disk)."""
    if Capability.QCOW2 in capabilities:
        return "qcow2"
    if Capability.RAW in capabilities:
        return "raw"
    return None


def share(root: Path, kind: str, tag: str, read_only: bool = False) -> ShareSpec:
    host = root / "shares" / tag
    host.mkdir(parents=True, exist_ok=True)
    socket = root / "box" / f"{tag}.vhost.sock" if kind == "virtiofs" else None
    return ShareSpec(tag=tag, host_path=host, kind=kind, read_only=read_only, socket=socket)


def build_spec(
    root: Path,
    *,
    channel_kind: ChannelKind,
    capabilities: frozenset[Capability],
    channel_handshake: Handshake = Handshake.NONE,
    cpus: int = 1,
    memory_mib: int = 256,
    disk_read_only: bool = False,
    shares: Iterable[ShareSpec] = (),
    with_disk: bool = True,
) -> VmSpec:
    """A complete VmSpec rooted in ``root``; files the backend may look at exist (empty).

    The agent channel is built as the core builds it from the backend's ``channel_kind`` and
    ``channel_handshake`` (runtime/pipeline.py build_spec), the vsock cmdline key included.
    """
    box_dir = root / "box"
    kit = root / "kit"
    box_dir.mkdir(parents=True, exist_ok=True)
    kit.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img"):
        (kit / name).touch()
    disks: tuple[DiskSpec, ...] = ()
    fmt = disk_format_for(capabilities)
    if with_disk and fmt is not None:
        disk_path = box_dir / f"rootfs.{fmt}"
        disk_path.touch()
        disks = (DiskSpec(disk_path, fmt, disk_read_only, "rootfs"),)
    agent = AgentChannel(
        kind=channel_kind, socket=box_dir / "agent.sock", handshake=channel_handshake
    )
    cmdline = "console=ttyS0 quiet boxlite.conformance=1"
    return VmSpec(
        box_id="c0nf0rmance0000000000000000000001",
        box_dir=box_dir,
        cpus=cpus,
        memory_mib=memory_mib,
        kernel=kit / "vmlinuz",
        initrd=kit / "initrd.img",
        cmdline=" ".join(w for w in (cmdline, agent.cmdline_word) if w),
        console_log=box_dir / "console.log",
        agent=agent,
        disks=disks,
        shares=tuple(shares),
        name="conformance",
    )


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns): plan() must leave it unchanged."""
    out: dict[str, tuple[int, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out
