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


def qcow2_overlay(path: Path, backing: Path, size: int = 64 * 2**20) -> None:
    """Write a valid, empty qcow2 (version 2, 64 KiB clusters) of ``size`` bytes whose
    backing file is ``backing`` (raw): what the ``disk`` rootfs strategy gives a VM, so a
    backend that reads its disks' headers at plan time (a remote one, which uploads the
    base) sees a real one. Layout per QEMU's docs/interop/qcow2.txt: header + backing name
    in cluster 0, the refcount table in 1, its one block in 2, the L1 table in 3."""
    cluster = 1 << 16
    name = str(backing).encode()
    l1_size = max(1, -(-size // (cluster * (cluster // 8))))
    header = b"".join((
        b"QFI\xfb", (2).to_bytes(4, "big"), (72).to_bytes(8, "big"),
        len(name).to_bytes(4, "big"), (16).to_bytes(4, "big"), size.to_bytes(8, "big"),
        (0).to_bytes(4, "big"), l1_size.to_bytes(4, "big"), (3 * cluster).to_bytes(8, "big"),
        cluster.to_bytes(8, "big"), (1).to_bytes(4, "big"), (0).to_bytes(4, "big"),
        (0).to_bytes(8, "big"),
    ))
    image = bytearray(4 * cluster)
    image[:len(header)] = header
    image[72:72 + len(name)] = name
    image[cluster:cluster + 8] = (2 * cluster).to_bytes(8, "big")  # refcount block
    for index in range(4):  # clusters 0-3 are in use once each
        image[2 * cluster + 2 * index:2 * cluster + 2 * index + 2] = (1).to_bytes(2, "big")
    path.write_bytes(bytes(image))


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
    """A complete VmSpec rooted in ``root``; files the backend may look at exist (empty,
    but a qcow2 disk is a real qcow2 overlay over an empty raw base).

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
        if fmt == "qcow2":  # an overlay over a raw base, as the disk strategy makes
            base = kit / "base.raw"
            base.touch()
            qcow2_overlay(disk_path, base)
        else:
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
