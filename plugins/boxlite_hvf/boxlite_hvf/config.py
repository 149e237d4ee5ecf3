"""VmSpec → a plain-data description of a Virtualization.framework configuration.

Why a dict and not VZ objects: the plan must be pure, deterministic and JSON-serialisable so
it can be logged, diffed and tested on Linux, where the framework does not exist. The
framework layer (:mod:`boxlite_hvf.framework`) turns this dict into ``VZ*`` objects in the
runner process, and nothing else.

Device mapping (what the guest sees):

* boot: ``VZLinuxBootLoader`` (kernel, initrd, cmdline) on ``VZGenericPlatformConfiguration``.
  The console is a virtio console (``hvc0``), so ``console=ttyS0`` from the kit becomes
  ``console=hvc0``; its host end is a pipe the runner drains into ``spec.console_log``,
  capped at ``spec.console_log_max_bytes`` per file and rotated (``.1``, ``.2``).
* disks: ``VZVirtioBlockDeviceConfiguration`` + ``VZDiskImageStorageDeviceAttachment``.
  The framework opens **raw images only**: a qcow2 disk is listed with a ``convert`` step
  (``qemu-img convert -O raw``) and the device points at the raw target in the box dir.
* shares: ``VZVirtioFileSystemDeviceConfiguration`` + ``VZSingleDirectoryShare`` of a
  ``VZSharedDirectory`` (read-only enforced by the host). The framework is the virtiofs
  server: no virtiofsd, so a share's vhost-user ``socket`` is ignored. 9p does not exist here.
* agent: ``VZVirtioSocketDeviceConfiguration``. The runner listens on ``spec.agent.socket``
  and, per host connection, dials guest vsock port ``agent.port`` — every connect is a fresh
  stream (channel kind ``vsock``), the host side is the same unix socket as every backend.
* entropy: ``VZVirtioEntropyDeviceConfiguration``, so the guest's CRNG is ready at once.
* network: none. Boxes have no network unless asked, and the backend cannot provide one yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.spec import Capability, ChannelKind, DiskSpec, ShareSpec, VmSpec

#: ``VmSpec.backend_options`` keys this backend reads (any other key is refused, named):
#: ``hvf_watch_parent`` (bool): the runner exits (stopping the VM) when its parent dies.
BACKEND_OPTIONS = frozenset({"hvf_watch_parent"})
#: share kinds this backend attaches (both served by the framework's own virtiofs server).
VIRTIOFS_KINDS = frozenset({"virtiofs", "vz-virtiofs"})
#: Linux virtiofs tags hold at most 36 bytes (struct virtio_fs_config.tag).
MAX_TAG_BYTES = 36
#: folder in the box dir for files this backend makes (raw conversions of qcow2 disks).
WORK_DIR = "hvf"

ARCH_ALIASES: dict[str, str] = {"arm64": "arm64", "aarch64": "arm64", "x86_64": "x86_64",
                                "amd64": "x86_64"}

#: what VZLinuxBootLoader accepts, per guest architecture (the kit builder must deliver it).
KERNEL_FORMAT: dict[str, str] = {
    "arm64": "uncompressed arm64 Image (VZLinuxBootLoader rejects gzip/zboot-compressed ones)",
    "x86_64": "bzImage or uncompressed vmlinux",
}

_CONSOLE_RE = re.compile(r"^console=")
#: rotated console files kept besides console.log (as for every backend)
CONSOLE_BACKUPS = 2


def normalise_arch(arch: str) -> str:
    """boxlite/Debian/uname spellings → "arm64" or "x86_64" (the only two macOS runs)."""
    try:
        return ARCH_ALIASES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCH_ALIASES))
        raise ConfigError(
            f"hvf: architecture {arch!r} is not one Virtualization.framework runs; use one of "
            f"{known}"
        ) from None


def guest_cmdline(cmdline: str) -> str:
    """The spec's cmdline with the console moved to the virtio console.

    Every ``console=`` word goes (``ttyS0`` does not exist here: there is no UART), then
    ``console=hvc0`` is appended, so the result is the same for the same input whatever order
    the kit used. The agent's ``boxlite.agent_vsock=<port>`` is already there: the core adds
    it for a vsock channel.
    """
    words = [w for w in cmdline.split() if not _CONSOLE_RE.match(w)]
    return " ".join([*words, "console=hvc0"])


def agent_port(spec: VmSpec) -> int:
    """The guest vsock port of the agent channel (checked by AgentChannel itself).

    Raises:
        ConfigError: the channel is not vsock (this backend has no virtio-serial port).
    """
    if spec.agent.kind is not ChannelKind.VSOCK:
        raise ConfigError(
            f"hvf: agent channel kind {spec.agent.kind.value!r}: this backend reaches the "
            "agent over vsock only"
        )
    return spec.agent.vsock_port


def check_backend_options(spec: VmSpec) -> None:
    """Refuse ``backend_options`` keys this backend does not read.

    Raises:
        ConfigError: naming the first unknown key.
    """
    unknown = sorted(set(spec.backend_options) - BACKEND_OPTIONS)
    if unknown:
        raise ConfigError(
            f"backend_options {unknown[0]!r}: the hvf backend reads only {sorted(BACKEND_OPTIONS)}"
        )


def raw_target(spec: VmSpec, index: int, disk: DiskSpec) -> Path:
    """Where a qcow2 disk's raw copy lives: in the box dir, named after its serial or index."""
    stem = disk.serial or f"disk{index}"
    return spec.box_dir / WORK_DIR / f"{index:02d}-{stem}.raw"


def block_device(spec: VmSpec, index: int, disk: DiskSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": str(disk.path),
        "read_only": disk.read_only,
        "identifier": disk.serial,
        "convert": None,
    }
    if disk.format == "qcow2":
        target = raw_target(spec, index, disk)
        entry["path"] = str(target)
        entry["convert"] = {
            "from": "qcow2",
            "source": str(disk.path),
            "target": str(target),
            # the tool is resolved (require_tool) at launch; the plan names it only
            "argv": ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw",
                     str(disk.path), str(target)],
            # a writable disk's raw copy holds the guest's writes after the first boot: it is
            # made once and then kept; a read-only one is remade when its source is newer
            "reuse": "keep" if not disk.read_only else "if-newer",
        }
    return entry


def share_device(share: ShareSpec) -> dict[str, Any]:
    if share.kind not in VIRTIOFS_KINDS:
        cap = Capability.NINEP if share.kind == "9p" else share.kind
        raise ConfigError(
            f"hvf: share {share.tag!r} uses {share.kind!r} (capability {cap!s}), which "
            f"Virtualization.framework does not provide; use volume_sharer='virtiofs' (the "
            f"framework serves virtiofs itself), or the qemu backend for 9p"
        )
    tag_bytes = share.tag.encode()
    if not tag_bytes or len(tag_bytes) > MAX_TAG_BYTES:
        raise ConfigError(
            f"hvf: share tag {share.tag!r} must be 1-{MAX_TAG_BYTES} bytes (virtiofs tag limit)"
        )
    return {"tag": share.tag, "path": str(share.host_path), "read_only": share.read_only}


def vz_config(spec: VmSpec, arch: str) -> dict[str, Any]:
    """Pure: the complete Virtualization.framework configuration for ``spec``, as plain data.

    Raises ConfigError for what the framework cannot do (9p, networking, bad tags/ports),
    before anything is started.
    """
    arch = normalise_arch(arch)
    if spec.network:
        raise ConfigError(
            "hvf: networking is not supported by this backend yet; boxes run with no network"
        )
    check_backend_options(spec)
    port = agent_port(spec)
    tags = [s.tag for s in spec.shares]
    if len(set(tags)) != len(tags):
        raise ConfigError(f"hvf: share tags must be unique, got {tags}")
    return {
        "arch": arch,
        "platform": "generic",
        "boot_loader": {
            "kind": "linux",
            "kernel": str(spec.kernel),
            "initrd": str(spec.initrd),
            "cmdline": guest_cmdline(spec.cmdline),
            "kernel_format": KERNEL_FORMAT[arch],
        },
        "cpus": spec.cpus,
        "memory_bytes": spec.memory_mib * 1024 * 1024,
        "block_devices": [block_device(spec, i, d) for i, d in enumerate(spec.disks)],
        "shares": [share_device(s) for s in spec.shares],
        "vsock": {
            "agent_port": port,
            "bridge_socket": str(spec.agent.socket),
        },
        # the runner drains the console through a pipe into this file, capped and rotated
        "serial_console": {
            "device": "virtio-console",
            "log": str(spec.console_log),
            "max_bytes": int(spec.console_log_max_bytes),
            "backups": CONSOLE_BACKUPS,
        },
        "entropy": True,
        "network": None,
    }
