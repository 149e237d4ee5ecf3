"""The data that crosses boundaries: user options, VM specs, states and results.

All attrs classes validate at construction, so a bad option fails where the user wrote it,
naming the field — not deep inside a VM launch. Frozen where the value is shared, so a plan or
spec handed to a plugin cannot be changed behind the runtime's back.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError

MIN_MEMORY_MIB = 128
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[^=\0]+$")


class Capability(enum.StrEnum):
    """What a backend can do; conformance tests are gated on these names."""

    NINEP = "9p"
    VIRTIOFS = "virtiofs"
    QCOW2 = "qcow2"
    RAW = "raw"
    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"
    PAUSE = "pause"
    SNAPSHOT = "snapshot"
    ATTACH = "attach"
    KVM = "kvm"
    TCG = "tcg"
    HVF = "hvf"


class BoxStatus(enum.StrEnum):
    """A box's lifecycle state, stored as its value in the database."""

    CONFIGURED = "configured"
    #: a process is running the init pipeline; the record names it (state.starter: pid +
    #: start time) and the stage (state.stage), and, once launched, the VMM (state.vmm)
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def can_become(self, other: BoxStatus) -> bool:
        return other in _TRANSITIONS[self]

    @property
    def startable(self) -> bool:
        return self in (BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED)

    @property
    def may_have_vm(self) -> bool:
        """A VM may be live behind this record (starting, running or stopping)."""
        return self in (BoxStatus.STARTING, BoxStatus.RUNNING, BoxStatus.STOPPING)


# Failed is retryable: a start from Failed goes through the pipeline again. Every start
# passes through Starting, written before anything is spawned, so no VM ever runs behind a
# Configured/Stopped/Failed record; a Starting one whose starter died ends Failed.
_TRANSITIONS: dict[BoxStatus, frozenset[BoxStatus]] = {
    BoxStatus.CONFIGURED: frozenset({BoxStatus.STARTING, BoxStatus.FAILED}),
    BoxStatus.STARTING: frozenset({BoxStatus.RUNNING, BoxStatus.FAILED}),
    BoxStatus.RUNNING: frozenset({BoxStatus.STOPPING, BoxStatus.STOPPED, BoxStatus.FAILED}),
    BoxStatus.STOPPING: frozenset({BoxStatus.STOPPED, BoxStatus.FAILED}),
    BoxStatus.STOPPED: frozenset({BoxStatus.STARTING, BoxStatus.FAILED}),
    BoxStatus.FAILED: frozenset({BoxStatus.STARTING, BoxStatus.STOPPED, BoxStatus.FAILED}),
}


def _fail(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {why}")


def _check_abs_guest_path(field: str, value: str) -> None:
    if not value.startswith("/"):
        raise _fail(field, value, "guest path must be absolute (start with '/')")
    if "\0" in value or any(part == ".." for part in value.split("/")):
        raise _fail(field, value, "guest path must not contain '..' or NUL")


#: guest directories a volume may not cover: the guest's kernel fills them (devices, procfs,
#: sysfs). A host directory over /dev turns `>/dev/null` into a write to the host; over /proc
#: or /sys it is silently hidden by the kernel's own mount, or hides the kernel's.
RESERVED_GUEST_DIRS = ("/dev", "/proc", "/sys")


def normal_guest_path(value: str) -> str:
    """``value`` without empty and '.' components: '//dev/./shm/' -> '/dev/shm', '/.' -> '/'.

    Checked paths never hold '..' (refused first), so this is the path the guest mounts on.
    """
    return "/" + "/".join(part for part in value.split("/") if part not in ("", "."))


def check_timeout(field: str, value: float | None, *, allow_zero: bool = False) -> None:
    """Refuse a timeout that cannot mean a duration: negative, NaN, infinite (0 unless allowed).

    Why here: the agent treats anything not > 0 as "no timeout", so `--timeout -1` used to be
    silently ignored. Raises ConfigError naming ``field``.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, value, "must be a number of seconds")
    if math.isnan(value) or math.isinf(value):
        raise _fail(field, value, "must be a finite number of seconds")
    if allow_zero and value < 0:
        raise _fail(field, value, "must be 0 or more seconds")
    if not allow_zero and value <= 0:
        raise _fail(field, value, "must be more than 0 seconds (leave it out for no timeout)")


@attrs.frozen
class VolumeSpec:
    """A host directory the user wants inside the box (``-v HOST:GUEST[:ro]``)."""

    host_path: str
    guest_path: str
    read_only: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.host_path:
            raise _fail("volume.host_path", self.host_path, "must not be empty")
        _check_abs_guest_path("volume.guest_path", self.guest_path)
        target = normal_guest_path(self.guest_path)
        if target == "/":
            raise _fail("volume.guest_path", self.guest_path,
                        "cannot mount a volume over '/' (the box's root); use e.g. /data")
        for reserved in RESERVED_GUEST_DIRS:
            if target == reserved or target.startswith(reserved + "/"):
                raise _fail(
                    "volume.guest_path", self.guest_path,
                    f"{reserved} is reserved for the guest kernel (devices, /proc, /sys); "
                    "mount the volume elsewhere, e.g. /data",
                )

    @classmethod
    def parse(cls, text: str) -> VolumeSpec:
        """Parse ``HOST:GUEST[:ro|:rw]`` as the CLI's ``-v`` takes it."""
        parts = text.split(":")
        mode = "rw"
        if len(parts) == 3:
            mode = parts[2]
        elif len(parts) != 2:
            raise _fail("volume", text, "expected HOST:GUEST or HOST:GUEST:ro")
        if mode not in ("ro", "rw"):
            raise _fail("volume", text, "mode must be 'ro' or 'rw'")
        return cls(host_path=parts[0], guest_path=parts[1], read_only=mode == "ro")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class HostShare:
    """A host directory to be shared into the guest under a tag, by a volume sharer.

    ``uid``/``gid`` are the directory owner's: sharers that support it map guest writes to
    them (auto-idmap), so files a box writes belong to whoever owns the volume on the host.
    """

    tag: str
    host_path: Path
    read_only: bool = False
    uid: int | None = None
    gid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "host_path": str(self.host_path),
            "read_only": self.read_only,
            "uid": self.uid,
            "gid": self.gid,
        }


@attrs.frozen
class ResolvedVolume:
    """A VolumeSpec checked against the host: canonical path, owner, tag."""

    tag: str
    host_path: Path
    guest_path: str
    read_only: bool
    uid: int
    gid: int

    def share(self) -> HostShare:
        return HostShare(self.tag, self.host_path, self.read_only, self.uid, self.gid)

    def to_dict(self) -> dict[str, Any]:
        return {**self.share().to_dict(), "guest_path": self.guest_path}


def _env_validator(_inst: Any, _attr: Any, value: Mapping[str, str]) -> None:
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise _fail("env", key, "variable names must be non-empty and contain no '=' or NUL")
        if not isinstance(val, str) or "\0" in val:
            raise _fail(f"env[{key}]", val, "value must be a string without NUL")


def _cpus_validator(_inst: Any, _attr: Any, value: int) -> None:
    # The host's count is checked by runtime.capacity when a box is created, not here: a
    # stored record must still load on a host with fewer CPUs (to be listed and removed).
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail("cpus", value, "must be a whole number >= 1")


def _memory_validator(_inst: Any, _attr: Any, value: int) -> None:
    if not isinstance(value, int) or value < MIN_MEMORY_MIB:
        raise _fail("memory_mib", value, f"must be at least {MIN_MEMORY_MIB} MiB")


def _disk_validator(_inst: Any, _attr: Any, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 16):
        raise _fail("disk_size_mib", value, "must be at least 16 MiB (or None for the default)")


def _name_validator(_inst: Any, _attr: Any, value: str | None) -> None:
    if value is not None and not _NAME_RE.match(value):
        raise _fail(
            "name", value, "use 1-63 letters, digits, '_', '.' or '-', starting with a letter/digit"
        )


def _workdir_validator(_inst: Any, _attr: Any, value: str | None) -> None:
    if value is not None:
        _check_abs_guest_path("workdir", value)


def _volumes_converter(value: Any) -> tuple[VolumeSpec, ...]:
    out = []
    for item in value or ():
        if isinstance(item, str):
            item = VolumeSpec.parse(item)
        elif isinstance(item, Mapping):
            item = VolumeSpec(**item)
        out.append(item)
    return tuple(out)


def _volumes_validator(_inst: Any, _attr: Any, value: tuple[VolumeSpec, ...]) -> None:
    seen: set[str] = set()
    for vol in value:
        target = normal_guest_path(vol.guest_path)
        if target in seen:
            raise _fail("volume.guest_path", vol.guest_path, "two volumes use the same guest path")
        seen.add(target)


def _console_cap_validator(_inst: Any, _attr: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise _fail("console_log_max_mib", value, "must be a whole number of MiB, 1 to 65536")


@attrs.frozen
class BoxOptions:
    """Everything a user says about a box. Validated here, stored as JSON in the box record."""

    image: str = "busybox"
    backend: str | None = None
    cpus: int = attrs.field(default=1, validator=_cpus_validator)
    memory_mib: int = attrs.field(default=512, validator=_memory_validator)
    disk_size_mib: int | None = attrs.field(default=None, validator=_disk_validator)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=dict, validator=_env_validator)
    workdir: str | None = attrs.field(default=None, validator=_workdir_validator)
    user: str | None = None
    volumes: tuple[VolumeSpec, ...] = attrs.field(
        factory=tuple, converter=_volumes_converter, validator=_volumes_validator
    )
    name: str | None = attrs.field(default=None, validator=_name_validator)
    rootfs: str = "disk"
    volume_sharer: str | None = None
    auto_remove: bool = False
    network: bool = False
    #: cap of each guest console file on the host, MiB (rotated: at most 3 files per box);
    #: the guest decides how much it writes, so the host bounds what it keeps
    console_log_max_mib: int = attrs.field(default=4, validator=_console_cap_validator)

    def __attrs_post_init__(self) -> None:
        if not self.image:
            raise _fail("image", self.image, "name an image (e.g. 'busybox')")
        if self.network:
            raise _fail("network", True, "networking is not supported yet; boxes run with none")

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=True)
        data["env"] = dict(self.env)
        data["volumes"] = [v.to_dict() for v in self.volumes]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoxOptions:
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@attrs.frozen
class DiskSpec:
    """A block device for the VM. ``serial`` is how the guest finds it (/sys/block/vd*/serial)."""

    path: Path
    format: str = "qcow2"
    read_only: bool = False
    serial: str = ""

    def __attrs_post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise _fail("disk.format", self.format, "must be 'qcow2' or 'raw'")
        if len(self.serial) > 20:
            raise _fail("disk.serial", self.serial, "virtio-blk serials hold at most 20 chars")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "read_only": self.read_only,
            "serial": self.serial,
        }


@attrs.frozen
class ShareSpec:
    """A prepared share as the backend sees it: kind says which device to create.

    ``kind`` is the sharer's name ("9p", "virtiofs"). For virtiofs, ``socket`` is the
    vhost-user socket of the virtiofsd the sharer started.
    """

    tag: str
    host_path: Path
    kind: str
    read_only: bool = False
    socket: Path | None = None
    uid: int | None = None
    gid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "host_path": str(self.host_path),
            "kind": self.kind,
            "read_only": self.read_only,
            "socket": str(self.socket) if self.socket else None,
            "uid": self.uid,
            "gid": self.gid,
        }


@attrs.frozen
class AgentEndpoint:
    """Where the host reaches the guest agent: always a unix socket in the box directory.

    ``kind`` says how the backend maps it: "virtio-serial" (one byte stream, READY preface,
    the host bridges it) or "stream" (every connect is a fresh stream, e.g. vsock).
    """

    socket: Path
    kind: str = "virtio-serial"

    def to_dict(self) -> dict[str, Any]:
        return {"socket": str(self.socket), "kind": self.kind}


@attrs.frozen
class VmSpec:
    """What to boot, independent of the VMM. Backends turn it into a LaunchPlan.

    ``hints`` carries guest-kit facts a backend may use (e.g. "machine": "microvm",
    "qemu_globals": [...]); a backend that does not understand a hint ignores it.
    """

    box_id: str
    box_dir: Path
    cpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    agent: AgentEndpoint
    disks: tuple[DiskSpec, ...] = ()
    shares: tuple[ShareSpec, ...] = ()
    name: str = ""
    network: bool = False
    hints: Mapping[str, Any] = attrs.field(factory=dict)
    #: bytes each guest console file may hold before it is rotated (the guest feeds it)
    console_log_max_bytes: int = 4 * 1024 * 1024

    def to_dict(self) -> dict[str, Any]:
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
            "hints": dict(self.hints),
            "console_log_max_bytes": self.console_log_max_bytes,
        }


@attrs.frozen
class ProbeResult:
    """Can this backend run here? If not: why, and what the user should do."""

    available: bool
    reason: str = ""
    fix: str = ""
    details: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.available and not self.reason:
            raise ValueError("an unavailable ProbeResult must say why (reason)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "fix": self.fix,
            "details": dict(self.details),
        }


@attrs.frozen
class ExitStatus:
    """How a process ended: exactly one of exit_code / signal, or timed_out."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        """Shell convention: the exit code, or 128+N for a signal (124 for a timeout)."""
        if self.timed_out:
            return 124
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 255


@attrs.frozen
class ExecResult:
    """A finished command's status and captured output."""

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        return ExitStatus(self.exit_code, self.signal, self.timed_out).returncode

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.signal is None

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")
