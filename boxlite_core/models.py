"""The data that crosses boundaries: user options, box states, results and JSON shapes.

What a VMM backend is handed and declares (VmSpec, Capability, ProbeResult, ...) lives with
the rest of the VMM contract in :mod:`boxlite_core.vmm.spec`.

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
from typing import TYPE_CHECKING

import attrs

from .errors import ConfigError
from .jsontypes import JsonObject as JsonObject  # re-exported: the usual import
from .jsontypes import JsonValue as JsonValue
from .proto.wire import RESERVED_GUEST_DIRS as _RESERVED_GUEST_DIRS

if TYPE_CHECKING:
    from .network.policy import NetworkPolicy
    from .network.ports import PortMapping

MIN_MEMORY_MIB = 128
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[^=\0]+$")


class BoxStatus(enum.StrEnum):
    """A box's lifecycle state, stored as its value in the database."""

    CONFIGURED = "configured"
    #: a process is running the init pipeline; the record names it (state.starter: pid +
    #: start time) and the stage (state.stage), and, once launched, the VMM (state.vmm)
    STARTING = "starting"
    RUNNING = "running"
    #: the VM's vCPUs are frozen (Box.pause); resume() makes it Running again
    PAUSED = "paused"
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
        """A VM may be live behind this record (starting, running, paused or stopping)."""
        return self in (BoxStatus.STARTING, BoxStatus.RUNNING, BoxStatus.PAUSED,
                        BoxStatus.STOPPING)


# Failed is retryable: a start from Failed goes through the pipeline again. Every start
# passes through Starting, written before anything is spawned, so no VM ever runs behind a
# Configured/Stopped/Failed record; a Starting one whose starter died ends Failed.
_TRANSITIONS: dict[BoxStatus, frozenset[BoxStatus]] = {
    BoxStatus.CONFIGURED: frozenset({BoxStatus.STARTING, BoxStatus.FAILED}),
    BoxStatus.STARTING: frozenset({BoxStatus.RUNNING, BoxStatus.FAILED}),
    BoxStatus.RUNNING: frozenset(
        {BoxStatus.PAUSED, BoxStatus.STOPPING, BoxStatus.STOPPED, BoxStatus.FAILED}
    ),
    # a paused VM is resumed, stopped (resumed first, so its guest syncs), killed or lost
    BoxStatus.PAUSED: frozenset(
        {BoxStatus.RUNNING, BoxStatus.STOPPING, BoxStatus.STOPPED, BoxStatus.FAILED}
    ),
    BoxStatus.STOPPING: frozenset({BoxStatus.STOPPED, BoxStatus.FAILED}),
    BoxStatus.STOPPED: frozenset({BoxStatus.STARTING, BoxStatus.FAILED}),
    BoxStatus.FAILED: frozenset({BoxStatus.STARTING, BoxStatus.STOPPED, BoxStatus.FAILED}),
}


def invalid(field: str, value: object, why: str) -> ConfigError:
    """The one shape of a refused value: ``field=value: why`` (also used by vmm.spec)."""
    return ConfigError(f"{field}={value!r}: {why}")


def _check_abs_guest_path(field: str, value: str) -> None:
    if not value.startswith("/"):
        raise invalid(field, value, "guest path must be absolute (start with '/')")
    if "\0" in value or any(part == ".." for part in value.split("/")):
        raise invalid(field, value, "guest path must not contain '..' or NUL")


#: guest directories a volume may not cover (defined with the wire: the agent checks them too)
RESERVED_GUEST_DIRS = _RESERVED_GUEST_DIRS


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
        raise invalid(field, value, "must be a number of seconds")
    if math.isnan(value) or math.isinf(value):
        raise invalid(field, value, "must be a finite number of seconds")
    if allow_zero and value < 0:
        raise invalid(field, value, "must be 0 or more seconds")
    if not allow_zero and value <= 0:
        raise invalid(field, value, "must be more than 0 seconds (leave it out for no timeout)")


@attrs.frozen
class VolumeSpec:
    """A host directory the user wants inside the box (``-v HOST:GUEST[:ro]``).

    The user's words, as typed and as stored in the box record (``BoxOptions.volumes``, JSON
    ``{"host_path", "guest_path", "read_only"}``). Each start resolves it against the host
    into a :class:`HostShare` (``volumes.resolve.resolve_user_volumes``), the one type a
    volume sharer receives; the facts resolution adds are not stored here because they are
    the host's, read fresh at every start (see :class:`HostShare`).
    """

    host_path: str
    guest_path: str
    read_only: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.host_path:
            raise invalid("volume.host_path", self.host_path, "must not be empty")
        _check_abs_guest_path("volume.guest_path", self.guest_path)
        target = normal_guest_path(self.guest_path)
        if target == "/":
            raise invalid("volume.guest_path", self.guest_path,
                        "cannot mount a volume over '/' (the box's root); use e.g. /data")
        for reserved in RESERVED_GUEST_DIRS:
            if target == reserved or target.startswith(reserved + "/"):
                raise invalid(
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
            raise invalid("volume", text, "expected HOST:GUEST or HOST:GUEST:ro")
        if mode not in ("ro", "rw"):
            raise invalid("volume", text, "mode must be 'ro' or 'rw'")
        return cls(host_path=parts[0], guest_path=parts[1], read_only=mode == "ro")

    def to_dict(self) -> JsonObject:
        """``{"host_path", "guest_path", "read_only"}``: the box record's form."""
        return {"host_path": self.host_path, "guest_path": self.guest_path,
                "read_only": self.read_only}  # fmt: skip


@attrs.frozen
class HostShare:
    """A host directory to be shared into the guest under a tag: what a volume sharer gets.

    Two kinds, one type: a user's volume resolved for this start (``guest_path`` set: the
    agent mounts it there) and a rootfs strategy's share (``guest_path`` None: the artifact's
    ``guest`` says how the root uses it). Why not the :class:`VolumeSpec` itself: resolution
    adds facts of the host that change between starts and must not be stored — the canonical
    ``host_path`` (symlinks resolved), the owner, and the ``tag`` (by position, ``uservolN``).

    ``uid``/``gid`` are the directory owner's (None for rootfs shares: the box's own tree,
    many owners): sharers that support it map guest writes to them (auto-idmap), so files a
    box writes belong to whoever owns the volume on the host.
    """

    tag: str
    host_path: Path
    read_only: bool = False
    uid: int | None = None
    gid: int | None = None
    #: where the guest mounts a user volume (absolute); None for a rootfs share
    guest_path: str | None = None

    def to_dict(self) -> JsonObject:
        """JSON, ``host_path`` as a string; ``guest_path`` only for a user volume."""
        out: JsonObject = {
            "tag": self.tag,
            "host_path": str(self.host_path),
            "read_only": self.read_only,
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.guest_path is not None:
            out["guest_path"] = self.guest_path
        return out


def _env_validator(_inst: object, _attr: object, value: Mapping[str, str]) -> None:
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise invalid("env", key, "variable names must be non-empty and contain no '=' or NUL")
        if not isinstance(val, str) or "\0" in val:
            raise invalid(f"env[{key}]", val, "value must be a string without NUL")


def _cpus_validator(_inst: object, _attr: object, value: int) -> None:
    # The host's count is checked by runtime.capacity when a box is created, not here: a
    # stored record must still load on a host with fewer CPUs (to be listed and removed).
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid("cpus", value, "must be a whole number >= 1")


def _memory_validator(_inst: object, _attr: object, value: int) -> None:
    if not isinstance(value, int) or value < MIN_MEMORY_MIB:
        raise invalid("memory_mib", value, f"must be at least {MIN_MEMORY_MIB} MiB")


def _disk_validator(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 16):
        raise invalid("disk_size_mib", value, "must be at least 16 MiB (or None for the default)")


def _name_validator(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and not _NAME_RE.match(value):
        raise invalid(
            "name", value, "use 1-63 letters, digits, '_', '.' or '-', starting with a letter/digit"
        )


def _workdir_validator(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None:
        _check_abs_guest_path("workdir", value)


def _argv_converter(field: str, *, empty_is_unset: bool):
    """A converter for an argv-like option: None stays None; a list/tuple of str becomes a
    tuple. A bare string is refused (``"sh -c"`` would otherwise be split one way or another
    behind the user's back: docker's API takes a list too)."""

    def convert(value: object) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise invalid(field, value, "give a list of arguments, e.g. ['sh', '-c'], or None")
        for item in value:
            if not isinstance(item, str) or "\0" in item:
                raise invalid(field, value, "each argument must be a string without NUL")
        if empty_is_unset and not value:
            return None
        return tuple(value)

    return convert


def _volumes_converter(value: object) -> tuple[VolumeSpec, ...]:
    out = []
    for item in value or ():
        if isinstance(item, str):
            item = VolumeSpec.parse(item)
        elif isinstance(item, Mapping):
            item = VolumeSpec(**item)
        out.append(item)
    return tuple(out)


def _volumes_validator(_inst: object, _attr: object, value: tuple[VolumeSpec, ...]) -> None:
    seen: set[str] = set()
    for vol in value:
        target = normal_guest_path(vol.guest_path)
        if target in seen:
            raise invalid("volume.guest_path", vol.guest_path,
                          "two volumes use the same guest path")
        seen.add(target)


def _host_validator(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()
                              or len(value) > 1024
                              or any(c.isspace() or ord(c) < 32 for c in value)):
        raise invalid("host", value, "a backend's name for another machine, e.g. the libvirt "
                                     "URI qemu+ssh://user@host/system (no spaces)")


def _snapshot_validator(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and not _NAME_RE.match(value):
        raise invalid("snapshot", value, "a snapshot name: 1-63 letters, digits, '_', '.' or '-'")


def _network_converter(value: object) -> NetworkPolicy:
    """``BoxOptions.network``: a NetworkPolicy; None/False (old records) → no network; a
    mode name ("none", "allowlist", "full"); the JSON a record stores."""
    from .network.policy import NetworkPolicy

    if isinstance(value, NetworkPolicy):
        return value
    if value is None or value is False:
        return NetworkPolicy.parse((), None)
    if isinstance(value, str):
        if value.strip().lower() not in ("none", "full"):
            raise invalid("network", value, "'none' or 'full'; an allowlist is "
                          "NetworkPolicy.parse(['pypi.org:443'], None)")
        return NetworkPolicy.parse((), value)
    if isinstance(value, Mapping):
        return NetworkPolicy.from_json(dict(value))
    raise invalid("network", value, "a NetworkPolicy (NetworkPolicy.parse(['pypi.org:443'])), "
                  "or 'none' | 'full'")


def _ports_converter(value: object) -> tuple[PortMapping, ...]:
    """``BoxOptions.ports``: PortMapping items, docker's ``-p`` strings or their JSON."""
    from .network.ports import PortMapping, parse_port

    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise invalid("ports", value, "a list of PortMapping or '[HOSTIP:]HOSTPORT:GUESTPORT'")
    out = []
    for item in value:
        if isinstance(item, PortMapping):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_port(item))
        elif isinstance(item, Mapping):
            out.append(PortMapping.from_json(dict(item)))
        else:
            raise invalid("ports", item, "a PortMapping or '[HOSTIP:]HOSTPORT:GUESTPORT'")
    seen: set[tuple[str, int]] = set()
    for mapping in out:
        key = (mapping.host_ip, mapping.host_port)
        if mapping.host_port and key in seen:
            raise invalid("ports", str(mapping), "two mappings use the same host address")
        seen.add(key)
    return tuple(out)


def _console_cap_validator(_inst: object, _attr: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise invalid("console_log_max_mib", value, "must be a whole number of MiB, 1 to 65536")


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
    #: what the box may connect to (checked on the host); the default is no network at all
    network: NetworkPolicy = attrs.field(default=None, converter=_network_converter)
    #: box ports published on the host (docker's ``-p``)
    ports: tuple[PortMapping, ...] = attrs.field(factory=tuple, converter=_ports_converter)
    #: cap of each guest console file on the host, MiB (rotated: at most 3 files per box);
    #: the guest decides how much it writes, so the host bounds what it keeps
    console_log_max_mib: int = attrs.field(default=4, validator=_console_cap_validator)
    #: start from a boot template when one fits (a saved VM: ~1 s instead of a kernel boot);
    #: False always boots the kernel (``BOXLITE_TEMPLATES=off`` does so for every box)
    template: bool = True
    #: the snapshot this box continues from on its first start (``boxlite snapshot ls``);
    #: its image, resources and volumes come from the snapshot's box
    snapshot: str | None = attrs.field(default=None, validator=_snapshot_validator)
    #: the program the box's default command starts with, replacing the image's
    #: Entrypoint (docker's ``--entrypoint``): None keeps the image's; ``[]`` clears it. As
    #: in docker, setting it also drops the image's Cmd: only ``cmd`` follows it
    entrypoint: tuple[str, ...] | None = attrs.field(
        default=None, converter=_argv_converter("entrypoint", empty_is_unset=False)
    )
    #: the arguments after the Entrypoint, replacing the image's Cmd (``boxlite run IMAGE --
    #: ARGS``); None (or empty) keeps the image's Cmd. The whole rule:
    #: :func:`boxlite_core.runtime.entrypoint.default_argv`
    cmd: tuple[str, ...] | None = attrs.field(
        default=None, converter=_argv_converter("cmd", empty_is_unset=True)
    )
    #: the machine the box runs on, as its backend names one (libvirt: a connection URI such
    #: as ``qemu+ssh://user@host/system``); None: this one (or the backend's default, e.g.
    #: BOXLITE_LIBVIRT_URI). A box created there stays there: the record keeps it.
    host: str | None = attrs.field(default=None, validator=_host_validator)

    def __attrs_post_init__(self) -> None:
        if not self.image:
            raise invalid("image", self.image, "name an image (e.g. 'busybox')")

    def to_dict(self) -> JsonObject:
        data = attrs.asdict(self, recurse=True)
        data["env"] = dict(self.env)
        data["volumes"] = [v.to_dict() for v in self.volumes]
        data["network"] = self.network.to_json()
        data["ports"] = [p.to_json() for p in self.ports]
        for argv in ("entrypoint", "cmd"):
            value = getattr(self, argv)
            data[argv] = None if value is None else list(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BoxOptions:
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@attrs.frozen
class ExitStatus:
    """How a process ended: ``exit_code`` for a normal exit, ``signal`` when killed by one.

    ``timed_out`` is set when the exec's own timeout fired (``signal`` then says how it died).
    One class from the agent channel (``ExecSession.wait``) up to the public ``Execution.wait``.
    """

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0 (not killed, not timed out)."""
        return self.exit_code == 0 and not self.timed_out and self.signal is None

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
    def status(self) -> ExitStatus:
        """How the command ended, without its output."""
        return ExitStatus(self.exit_code, self.signal, self.timed_out)

    @property
    def returncode(self) -> int:
        """Shell convention: see :attr:`ExitStatus.returncode`."""
        return self.status.returncode

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")
