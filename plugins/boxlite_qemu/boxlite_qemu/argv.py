"""VmSpec → QEMU argv. Pure: everything host-specific comes in as :class:`QemuHost`.

The layout (BOXDIR/qmp.sock, qemu.pid, qemu.log, vm.json) is fixed here so launch, attach and
the tests agree on it. Device names follow the guest kit's virtio transport: microvm has no
PCI bus, so it gets ``virtio-*-device`` (virtio-mmio) devices; q35/virt get ``virtio-*-pci``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from boxlite_core.errors import ConfigError
from boxlite_core.models import JsonValue
from boxlite_core.vmm.consolelog import CONSOLE_SOCKET
from boxlite_core.vmm.spec import ChannelKind, ShareSpec, VmSpec

QMP_SOCKET = "qmp.sock"
PIDFILE = "qemu.pid"
QEMU_LOG = "qemu.log"
VM_STATE = "vm.json"
#: in a ``VmHandle.save_state`` directory: QEMU's migration stream (what a restore loads), and
#: facts about it for people and tools (``{"state_file", "qemu_version", "memory_bytes",
#: "stream_bytes", "save_seconds", "migration_ms"}``; a restore does not need them)
STATE_FILE = "qemu-vmstate"
STATE_INFO = "qemu-state.json"
#: ``VmSpec.backend_options`` keys the qemu backend reads (any other key is refused):
#: ``tcg_tb_size_mib`` (int > 0): TCG's translation-block cache size, ``-accel tcg,tb-size=N``
#: (QEMU's default is 1 GiB of host RAM per VM at most; bench/qemu_rss.py measures it)
BACKEND_OPTIONS = frozenset({"tcg_tb_size_mib"})

QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
DEFAULT_MACHINE = {"x86_64": "q35", "aarch64": "virt"}
#: sun_path holds 108 bytes including the NUL
MAX_SOCKET_PATH = 107
#: QEMU's seccomp filter: everything a VM never needs (new processes, setuid, obsolete calls,
#: scheduler/resource tweaks). spawn=deny is safe: we never let QEMU exec helpers.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@attrs.frozen
class QemuHost:
    """What plan() may know about the host: probed once by the backend, then fixed."""

    binary: str
    arch: str = "x86_64"
    accel: str = "tcg"
    sandbox: bool = True
    euid: int = 0


def qopt(value: str | os.PathLike[str]) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option string (',' doubles)."""
    return os.fspath(value).replace(",", ",,")


def _check_socket(what: str, path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{what} socket path {path} is longer than {MAX_SOCKET_PATH} bytes, the unix socket "
            "limit; use a shorter BOXLITE_HOME (box directory)"
        )


def machine_of(spec: VmSpec, arch: str) -> tuple[str, str]:
    """(machine, virtio transport) from the kit's guest hints, defaulting per architecture."""
    machine = spec.guest.machine or DEFAULT_MACHINE.get(arch, "q35")
    transport = spec.guest.virtio_transport or ("mmio" if machine == "microvm" else "pci")
    if machine == "microvm" and transport != "mmio":
        raise ConfigError(
            "guest.machine 'microvm' has no PCI bus; use guest.virtio_transport 'mmio'"
        )
    return machine, transport


def tcg_tb_size_mib(options: Mapping[str, JsonValue]) -> int | None:
    """The ``tcg_tb_size_mib`` backend option, checked; refuses keys this backend does not read.

    Raises:
        ConfigError: an unknown key (named), or a size that is not a whole number > 0.
    """
    unknown = sorted(set(options) - BACKEND_OPTIONS)
    if unknown:
        raise ConfigError(
            f"backend_options {unknown[0]!r}: the qemu backend reads only "
            f"{sorted(BACKEND_OPTIONS)}"
        )
    value = options.get("tcg_tb_size_mib")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"backend_options tcg_tb_size_mib={value!r}: must be a whole number of MiB > 0"
        )
    return value


#: host modes of what a guest creates through a writable 9p share (mapped-xattr), less QEMU's
#: umask (022 in the qemu backend): readable by the volume's owner, never executable or setuid
NINEP_FMODE = "0644"
NINEP_DMODE = "0755"


def ninep_security_model(share: ShareSpec, euid: int) -> str:
    """The 9p ``security_model`` of one share. A writable user volume (owner recorded):
    ``mapped-xattr`` whoever runs QEMU — guest owners, modes (setuid included), device nodes
    and symlinks live in ``user.virtfs.*`` xattrs, and the host file is a plain file or
    directory of QEMU's user with :data:`NINEP_FMODE`/:data:`NINEP_DMODE`; ``passthrough`` (as
    root) landed a guest's setuid-root binary and device nodes on the host as they were,
    ``none`` a setuid binary of QEMU's user. The price: QEMU then reads every symlink as a
    file holding its target, so a symlink made on the host reads as ELOOP in the guest.
    Read-only (``readonly=on``: nothing is written) and rootfs shares (no owner: the box's
    own tree under the private boxlite home, full of host-made symlinks): as before,
    ``passthrough`` as root, ``none`` unprivileged."""
    if not share.read_only and share.uid is not None:
        return "mapped-xattr"
    return "passthrough" if euid == 0 else "none"


def ninep_fsdev_options(share: ShareSpec, fsdev: str, euid: int) -> str:
    """The ``-fsdev local,...`` option string of one 9p share (see ninep_security_model)."""
    model = ninep_security_model(share, euid)
    opts = f"local,id={fsdev},path={qopt(share.host_path)},security_model={model}"
    if model.startswith("mapped"):
        opts += f",fmode={NINEP_FMODE},dmode={NINEP_DMODE}"
    if share.read_only:
        opts += ",readonly=on"
    return opts


#: x86 TCG CPU model: QEMU's default (qemu64) plus ARAT, "APIC timer always running"
#: (CPUID.06H:EAX[2]; QEMU's TCG emulates it). Without it Linux flags the local APIC timer
#: as stopping in deep C-states, wants a broadcast timer the microvm machine lacks, and stays
#: in periodic-tick mode: no high-resolution timers (4 ms sleep granularity) and a 250 Hz tick
#: even when idle. Measured here: an idle box's QEMU used 6.2 % of a core, 2.0 % with ARAT.
TCG_X86_CPU = "qemu64,+arat"


def build_argv(spec: VmSpec, host: QemuHost) -> tuple[list[str], dict[str, Any]]:
    """The QEMU argv for ``spec`` and the plan facts that go with it."""
    box = Path(spec.box_dir)
    machine, transport = machine_of(spec, host.arch)
    dev = "device" if transport == "mmio" else "pci"
    qmp_socket = box / QMP_SOCKET
    pidfile = box / PIDFILE
    _check_socket("QMP", qmp_socket)
    tb_mib = tcg_tb_size_mib(spec.backend_options)
    if spec.agent.kind is not ChannelKind.VIRTIO_SERIAL:
        raise ConfigError(
            f"agent channel kind {spec.agent.kind.value!r}: the qemu backend maps the agent "
            "over virtio-serial only (no vhost-vsock here)"
        )
    _check_socket("agent", Path(spec.agent.socket))

    has_virtiofs = any(s.kind == "virtiofs" for s in spec.shares)
    machine_opts = [machine]
    if machine == "microvm":
        machine_opts.append("isa-serial=on")  # the kit's console=ttyS0
    if has_virtiofs:
        # vhost-user-fs maps guest RAM into virtiofsd: RAM must be a shareable memfd
        machine_opts.append("memory-backend=mem")

    argv: list[str] = [
        host.binary,
        "-name", qopt(f"boxlite-{spec.name or spec.box_id}"),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-machine", ",".join(machine_opts),
    ]
    if host.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    elif host.accel == "hvf":
        argv += ["-accel", "hvf", "-cpu", "host"]
    else:
        # multi-threaded TCG: one host thread per vCPU (x86-on-x86 is safe for MTTCG)
        tcg = "tcg,thread=multi" if spec.cpus > 1 else "tcg"
        if tb_mib:
            tcg += f",tb-size={tb_mib}"
        argv += ["-accel", tcg]
        if host.arch == "aarch64":
            argv += ["-cpu", "max"]
        else:
            argv += ["-cpu", TCG_X86_CPU]
    argv += ["-smp", str(spec.cpus), "-m", f"{spec.memory_mib}M"]
    if has_virtiofs:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
    if host.sandbox:
        argv += ["-sandbox", SANDBOX]
    for glob in spec.guest.qemu_globals:
        argv += ["-global", glob]

    # the console goes through the capped writer (boxlite_core.vmm.logwriter): QEMU serves it
    # on a socket and waits (wait=on) for the writer before the guest runs, so no boot line
    # is lost; a file chardev would grow without limit at the guest's will
    console_socket = box / CONSOLE_SOCKET
    _check_socket("console", console_socket)
    argv += [
        "-chardev", f"socket,id=console,path={qopt(console_socket)},server=on,wait=on",
        "-serial", "chardev:console",
        # QMP as a chardev (the long form of -qmp) so launch can hand QEMU a socket it bound
        "-chardev", f"socket,id=qmp,path={qopt(qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(pidfile),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
    ]
    if machine == "q35" or machine.startswith(("pc-q35", "pc-i440fx")) or machine == "pc":
        # a fresh VM generation ID in every QEMU (guid=auto): a guest restored from a saved
        # state sees it change and reseeds its RNG at once (Linux's vmgenid driver). microvm
        # gets none: QEMU 7.2 lists no vmgenid in microvm's ACPI tables (measured: no
        # QEMUVGID device in the guest), so there the agent's reseed at Init is the only one
        argv += ["-device", "vmgenid,guid=auto"]
    if spec.network:
        # never open user networking: restrict=on keeps the guest off the host's networks
        argv += ["-nic", f"user,model=virtio-net-{dev},restrict=on"]
    else:
        argv += ["-nic", "none"]

    for index, disk in enumerate(spec.disks):
        drive = f"disk{index}"  # drive_ids() says the same
        serial = f",serial={qopt(disk.serial)}" if disk.serial else ""
        argv += [
            "-drive",
            f"file={qopt(disk.path)},format={disk.format},if=none,id={drive},"
            f"readonly={'on' if disk.read_only else 'off'},cache=writeback,discard=unmap",
            "-device",
            f"virtio-blk-{dev},drive={drive}{serial}",
        ]

    for index, share in enumerate(spec.shares):
        if share.kind == "9p":
            fsdev = f"fs{index}"
            opts = ninep_fsdev_options(share, fsdev, host.euid)
            argv += [
                "-fsdev", opts,
                "-device", f"virtio-9p-{dev},fsdev={fsdev},mount_tag={qopt(share.tag)}",
            ]
        elif share.kind == "virtiofs":
            if share.socket is None:
                raise ConfigError(
                    f"share {share.tag!r}: kind 'virtiofs' needs the virtiofsd socket "
                    "(start it with the virtiofs volume sharer)"
                )
            _check_socket(f"virtiofs {share.tag}", Path(share.socket))
            chardev = f"vfs{index}"
            argv += [
                "-chardev", f"socket,id={chardev},path={qopt(share.socket)}",
                "-device", f"vhost-user-fs-{dev},chardev={chardev},tag={qopt(share.tag)}",
            ]
        else:
            raise ConfigError(
                f"share {share.tag!r}: kind {share.kind!r} is not one the qemu backend can "
                "attach (it knows '9p' and 'virtiofs')"
            )

    argv += [
        "-chardev", f"socket,id=agent,path={qopt(spec.agent.socket)},server=on,wait=off",
        "-device", f"virtio-serial-{dev}",
        "-device", f"virtserialport,chardev=agent,name={qopt(spec.agent.port_name)}",
    ]
    if spec.restore_from is not None:
        # the same VM, waiting for its state: launch feeds the stream over QMP
        # (migrate-incoming uri=fd:...), then lets it run (cont)
        argv += ["-incoming", "defer"]
    facts = {
        "accel": host.accel,
        "machine": machine,
        "virtio_transport": transport,
        "qmp_socket": str(qmp_socket),
        "pidfile": str(pidfile),
        "log": str(box / QEMU_LOG),
        "state_file": str(box / VM_STATE),
        "sandbox": host.sandbox,
        "console_socket": str(console_socket),
        # the server sockets launch binds itself and passes as fds (listeners.py)
        "listen": [str(console_socket), str(qmp_socket), str(spec.agent.socket)],
        "console_log": str(spec.console_log),
        "console_log_max_bytes": spec.console_log_max_bytes,
        # disk serial → QEMU drive id: save_state switches a disk by its serial
        # (blockdev-snapshot-sync names the drive)
        "drives": drive_ids(spec),
    }
    if spec.restore_from is not None:
        facts["restore_state"] = str(Path(spec.restore_from) / STATE_FILE)
    return argv, facts


def drive_ids(spec: VmSpec) -> dict[str, str]:
    """``{disk serial: QEMU drive id}`` for the spec's disks that have a serial (build_argv
    names the drive of ``spec.disks[i]`` ``disk<i>``)."""
    return {disk.serial: f"disk{index}" for index, disk in enumerate(spec.disks) if disk.serial}
