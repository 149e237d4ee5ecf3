"""What a VMM backend is asked to boot, and what it declares: the data half of the contract.

:mod:`.base` holds the behaviour half (``VmmBackend``, ``VmHandle``, ``LaunchPlan``); both are
re-exported for backend authors by :mod:`boxlite_core.vendor`. A :class:`VmSpec` is built by
the runtime's start pipeline (``runtime/pipeline.py`` ``build_spec``), handed to
``VmmBackend.plan`` and saved inside ``BOXDIR/plan.json``; everything here is frozen so a
backend cannot change a spec behind the runtime's back, and validates at construction so a
bad value fails where it was made.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path

import attrs

from ..models import JsonObject, JsonValue, invalid
from ..proto.wire import AGENT_PORT_NAME, AGENT_VSOCK_CMDLINE_KEY, AGENT_VSOCK_PORT

__all__ = [
    "AGENT_PORT_NAME",
    "AGENT_VSOCK_CMDLINE_KEY",
    "AGENT_VSOCK_PORT",
    "AgentChannel",
    "Capability",
    "CapabilityGroup",
    "ChannelKind",
    "DiskSpec",
    "DiskSwitch",
    "GuestHints",
    "Handshake",
    "ProbeResult",
    "ShareSpec",
    "VmSpec",
]


class CapabilityGroup(enum.StrEnum):
    """The three kinds of :class:`Capability` (see there for each member's meaning)."""

    DEVICES = "devices"
    OPERATIONS = "operations"
    ACCELERATION = "acceleration"


class Capability(enum.StrEnum):
    """What a backend can do; conformance tests are gated on these names.

    A backend declares them in ``VmmBackend.capabilities()``; :attr:`group` says which kind:

    * devices — what the backend can attach to a VM: ``9p`` and ``virtiofs`` shares
      (``ShareSpec.kind``; virtiofs needs guest RAM the vhost-user daemon can map), ``qcow2``
      and ``raw`` disks (``DiskSpec.format``), and the agent channel it maps,
      ``virtio-serial`` or ``vsock`` (its ``channel_kind``).
    * operations — what it can do to a running VM: ``pause`` (``VmHandle.pause``/``resume``),
      ``snapshot`` (``VmHandle.save_state``, ``VmSpec.restore_from`` and
      ``VmmBackend.snapshot_compat``: boot templates, snapshots and fork), ``attach``
      (``VmmBackend.attach`` re-adopts a VM another process launched), ``network`` (boxes
      may have a network policy and published ports: the box network rides the agent
      channel — the core's relay on the host, the core's agent in the guest — so a backend
      declares it when its guest runs the core's guest kit unchanged and its channel carries
      many concurrent streams; it needs no network device of its own).
    * acceleration — how it runs guests on this host: ``kvm``, ``hvf`` (hardware) or ``tcg``
      (software emulation). Declare only what the host really gives:
      ``boxlite_core.vmm.accel.host_acceleration()`` says which.
    """

    NINEP = "9p"
    VIRTIOFS = "virtiofs"
    QCOW2 = "qcow2"
    RAW = "raw"
    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"
    PAUSE = "pause"
    SNAPSHOT = "snapshot"
    ATTACH = "attach"
    NETWORK = "network"
    KVM = "kvm"
    TCG = "tcg"
    HVF = "hvf"

    @property
    def group(self) -> CapabilityGroup:
        """Which kind of capability this is: devices, operations or acceleration."""
        return _CAPABILITY_GROUPS[self]


_CAPABILITY_GROUPS: dict[Capability, CapabilityGroup] = {
    **dict.fromkeys(
        (Capability.NINEP, Capability.VIRTIOFS, Capability.QCOW2, Capability.RAW,
         Capability.VIRTIO_SERIAL, Capability.VSOCK),
        CapabilityGroup.DEVICES,
    ),
    **dict.fromkeys((Capability.PAUSE, Capability.SNAPSHOT, Capability.ATTACH,
                     Capability.NETWORK),
                    CapabilityGroup.OPERATIONS),
    **dict.fromkeys((Capability.KVM, Capability.TCG, Capability.HVF),
                    CapabilityGroup.ACCELERATION),
}


@attrs.frozen
class DiskSpec:
    """A block device for the VM. ``serial`` is how the guest finds it (/sys/block/vd*/serial)."""

    path: Path
    format: str = "qcow2"
    read_only: bool = False
    serial: str = ""

    def __attrs_post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise invalid("disk.format", self.format, "must be 'qcow2' or 'raw'")
        if len(self.serial) > 20:
            raise invalid("disk.serial", self.serial, "virtio-blk serials hold at most 20 chars")

    def to_dict(self) -> JsonObject:
        return {
            "path": str(self.path),
            "format": self.format,
            "read_only": self.read_only,
            "serial": self.serial,
        }


@attrs.frozen
class DiskSwitch:
    """Move a running VM's writable disk onto a new qcow2 overlay while its state is saved.

    ``VmHandle.save_state(..., switch_disks=...)`` takes these. Before the call the VM writes
    the disk whose ``DiskSpec.serial`` is ``serial`` at ``path``; the core has created
    ``overlay``, a qcow2 whose backing file holds ``path``'s content (the core keeps that
    content under another name: it becomes the frozen disk of a snapshot). While the VM is
    paused the backend makes the VM write to ``overlay`` from then on, and before
    ``save_state`` returns renames ``overlay`` to ``path``: the box keeps its disk's name, the
    frozen content is never written again, and nothing is copied.
    """

    serial: str
    path: Path = attrs.field(converter=Path)
    overlay: Path = attrs.field(converter=Path)


@attrs.frozen
class ShareSpec:
    """A prepared share as the backend sees it: kind says which device to create.

    ``kind`` is the sharer's name ("9p", "virtiofs"). For virtiofs, ``socket`` is the
    vhost-user socket of the virtiofsd the sharer started.

    virtiofs needs the guest's RAM to be shareable memory, because virtiofsd maps it to reach
    the guest's buffers: the qemu backend adds ``-object memory-backend-memfd,id=mem,
    size=<memory_mib>M,share=on`` and ``-machine <machine>,memory-backend=mem`` whenever a
    share is virtiofs (plugins/boxlite_qemu/boxlite_qemu/argv.py build_argv); without it
    virtiofsd cannot map the guest's memory and the share does not work. ``read_only`` on a
    virtiofs share is enforced by the sharer (virtiofsd's ``--readonly``, or a read-only bind
    of the directory where it lacks the flag: volumes/virtiofs.py), not by the backend's
    device: vhost-user-fs has no read-only switch, so a backend need do nothing for it.
    """

    tag: str
    host_path: Path
    kind: str
    read_only: bool = False
    socket: Path | None = None
    uid: int | None = None
    gid: int | None = None

    def to_dict(self) -> JsonObject:
        return {
            "tag": self.tag,
            "host_path": str(self.host_path),
            "kind": self.kind,
            "read_only": self.read_only,
            "socket": str(self.socket) if self.socket else None,
            "uid": self.uid,
            "gid": self.gid,
        }


class ChannelKind(enum.StrEnum):
    """How the backend maps the agent socket into the guest."""

    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"


class Handshake(enum.StrEnum):
    """What the core says on the agent socket before the stream is the agent's.

    FIRECRACKER_CONNECT: Firecracker hybrid vsock — the host writes ``CONNECT <port>\\n`` on
    the unix socket and reads ``OK <host_port>\\n`` (see Firecracker docs/vsock.md).
    """

    NONE = "none"
    FIRECRACKER_CONNECT = "firecracker-connect"


def _channel_kind(value: str) -> ChannelKind:
    try:
        return ChannelKind(value)
    except ValueError:
        known = [k.value for k in ChannelKind]
        raise invalid("agent.kind", value, f"must be one of {known}") from None


def _handshake(value: str) -> Handshake:
    try:
        return Handshake(value)
    except ValueError:
        known = [h.value for h in Handshake]
        raise invalid("agent.handshake", value, f"must be one of {known}") from None


def _vsock_port_validator(_inst: object, _attr: object, value: int) -> None:
    # below 1024 is privileged in the guest; 0xFFFFFFFF is VMADDR_PORT_ANY
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value < 0xFFFFFFFF:
        raise invalid("agent.vsock_port", value, "must be a whole number in [1024, 4294967295)")


@attrs.frozen
class AgentChannel:
    """Where and how the host reaches the guest agent: a unix socket in the box directory.

    Who creates the socket: the BACKEND, as a listening server (QEMU ``-chardev socket,
    server=on``, Firecracker's vsock ``uds_path``, libkrun's ``krun_add_vsock_port2(...,
    listen=true)``); the core only dials it. It may appear after ``launch()`` returns: the
    core waits for it (up to the boot timeout) while the VM is alive, so a backend need not
    block on it. A stale file from an earlier boot is the backend's to remove before launch.

    ``kind`` (from the backend's ``channel_kind``):

    * ``VIRTIO_SERIAL``: the backend exposes a virtio-serial port named ``port_name`` (the
      guest agent opens ``/sys/class/virtio-ports/*/name == port_name``) and wires it to the
      socket. One byte stream: the agent writes ``READY\\n`` each time a host attaches.
    * ``VSOCK``: every connect on the socket is a fresh stream to guest vsock port
      ``vsock_port``; the core appends ``boxlite.agent_vsock=<vsock_port>`` to
      ``VmSpec.cmdline`` so the guest listens there (a backend never adds it).
      ``handshake`` (from ``channel_handshake``) says what the core sends first on each
      stream: ``FIRECRACKER_CONNECT`` writes ``CONNECT <vsock_port>\\n`` and waits for
      ``OK <n>\\n``, as Firecracker's hybrid vsock wants.

    Raises:
        ConfigError: ``vsock_port`` outside [1024, 4294967295), or an unknown kind/handshake.
    """

    kind: ChannelKind = attrs.field(converter=_channel_kind)
    socket: Path = attrs.field(converter=Path)
    port_name: str = AGENT_PORT_NAME
    vsock_port: int = attrs.field(default=AGENT_VSOCK_PORT, validator=_vsock_port_validator)
    handshake: Handshake = attrs.field(default=Handshake.NONE, converter=_handshake)

    @property
    def cmdline_word(self) -> str:
        """What the guest's kernel cmdline needs for this channel ("" for virtio-serial)."""
        if self.kind is ChannelKind.VSOCK:
            return f"{AGENT_VSOCK_CMDLINE_KEY}={self.vsock_port}"
        return ""

    def to_dict(self) -> dict[str, str | int]:
        return {
            "kind": self.kind.value,
            "socket": str(self.socket),
            "port_name": self.port_name,
            "vsock_port": self.vsock_port,
            "handshake": self.handshake.value,
        }


def _transport_validator(_inst: object, _attr: object, value: str) -> None:
    if value not in ("mmio", "pci", ""):
        raise invalid("guest.virtio_transport", value, "must be 'mmio', 'pci' or '' (unknown)")


@attrs.frozen
class GuestHints:
    """Typed facts about the guest kit, for the backend to use or ignore.

    These describe the guest, not a backend's choice: ``arch`` ("x86_64", "aarch64"; "" when
    unknown: use the host's), ``machine`` the QEMU machine type the kit was tuned for
    ("microvm", "q35", "" for the backend's default), ``virtio_transport`` the bus the kit's
    profile expects ("mmio", "pci", "" for the machine's natural one), ``qemu_globals`` the
    ``-global`` values that machine needs, ``kit_id`` the cache id of the kit.

    The kit's kernel drives BOTH virtio-mmio and virtio-pci (its initramfs loads virtio_mmio
    and virtio_pci on every boot: kit/modules.py GUEST_MODULES), so a backend may attach its
    devices on either bus whatever ``machine`` says; the hints only record what the kit was
    measured fastest with.

    Raises:
        ConfigError: ``virtio_transport`` is not "mmio", "pci" or "".
    """

    arch: str = ""
    machine: str = ""
    virtio_transport: str = attrs.field(default="", validator=_transport_validator)
    qemu_globals: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    kit_id: str = ""

    def to_dict(self) -> dict[str, str | list[str]]:
        return {
            "arch": self.arch,
            "machine": self.machine,
            "virtio_transport": self.virtio_transport,
            "qemu_globals": list(self.qemu_globals),
            "kit_id": self.kit_id,
        }


@attrs.frozen
class VmSpec:
    """What to boot, independent of the VMM. Backends turn it into a LaunchPlan.

    ``agent`` is the agent channel (see :class:`AgentChannel`: the backend serves its socket).
    ``guest`` holds typed facts about the guest kit (:class:`GuestHints`) a backend may use.
    ``backend_options`` holds one backend's own knobs (e.g. the qemu backend's
    ``tcg_tb_size_mib``, libkrun's ``krun_exec``): each backend documents the keys it reads
    and refuses any other key with a ConfigError naming it, so a knob meant for another
    backend fails loudly instead of being ignored. The runtime sets none today; they are for
    benchmarks, tests and vendors that build specs themselves. Values must be JSON (the spec
    is written to the box's plan.json).

    ``restore_from`` (backends declaring ``Capability.SNAPSHOT``): instead of booting the
    kernel, the VM continues from the memory and device state saved there. The core sets it
    only for a spec whose device layout (machine, cpus, memory, kernel, initrd, cmdline, and
    the disks and shares in order with their formats, serials, tags and virtual sizes) equals
    the saved VM's, and whose ``VmmBackend.snapshot_compat`` string is the one recorded at
    save time; the files behind the disks and shares may differ (that is how one template
    serves every box). ``launch`` returns once the VM runs again.
    """

    box_id: str
    box_dir: Path
    cpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    agent: AgentChannel
    disks: tuple[DiskSpec, ...] = ()
    shares: tuple[ShareSpec, ...] = ()
    name: str = ""
    network: bool = False
    guest: GuestHints = attrs.field(factory=GuestHints)
    backend_options: Mapping[str, JsonValue] = attrs.field(factory=dict)
    #: bytes each guest console file may hold before it is rotated (the guest feeds it)
    console_log_max_bytes: int = 4 * 1024 * 1024
    #: a directory ``VmHandle.save_state`` wrote (a boot template or a snapshot) for a VM with
    #: this spec's device layout; None boots the kernel (see the class docs above)
    restore_from: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))

    def to_dict(self) -> JsonObject:
        return {
            "box_id": self.box_id,
            "box_dir": str(self.box_dir),
            "name": self.name,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "console_log": str(self.console_log),
            "agent": self.agent.to_dict(),
            "disks": [d.to_dict() for d in self.disks],
            "shares": [s.to_dict() for s in self.shares],
            "network": self.network,
            "guest": self.guest.to_dict(),
            "backend_options": dict(self.backend_options),
            "console_log_max_bytes": self.console_log_max_bytes,
            "restore_from": str(self.restore_from) if self.restore_from else None,
        }


@attrs.frozen
class ProbeResult:
    """Can this backend run here? If not: why, and what the user should do."""

    available: bool
    reason: str = ""
    fix: str = ""
    details: Mapping[str, JsonValue] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.available and not self.reason:
            raise ValueError("an unavailable ProbeResult must say why (reason)")

    def to_dict(self) -> JsonObject:
        return {
            "available": self.available,
            "reason": self.reason,
            "fix": self.fix,
            "details": dict(self.details),
        }
