"""VmSpec → the ordered list of krun calls that boots it. Pure: no library, no hypervisor.

Why a list of calls: libkrun has no config file or command line. Its whole configuration is the
sequence of ``krun_*`` calls made on one context before ``krun_start_enter``, so that sequence
*is* the launch plan. Tests compare it; the launcher replays it.

Each entry is ``{"call": name, "args": [...]}`` where ``args`` leave out the context id (the
launcher supplies it). Optional keys tell the launcher how to treat libkrun versions:

* ``"if_present": symbol`` — skip the entry when the library lacks ``symbol``;
* ``"fallback": {call, args}`` — use this older call when the library lacks ``call``;
* ``"expect": value`` + ``"why"`` — a query whose result must equal ``value``.

Boot choice: the guest kit's own kernel + initramfs through ``krun_set_kernel`` (not
libkrunfw's bundled kernel), so the libkrun guest runs the same initramfs, agent and disk
layout as every other backend. ``backend_options["krun_root"]`` selects libkrun's other mode
instead (``krun_set_root`` a host directory + ``krun_set_exec``, booted with libkrunfw).

``VmSpec.backend_options`` keys this backend reads (any other key is refused, named):
``krun_root`` (host dir), ``krun_exec`` (argv list), ``krun_env`` (str → str),
``krun_workdir`` (guest dir) for that mode; ``krun_kernel_format`` (a KRUN_KERNEL_FORMAT
name) to skip sniffing the kernel; ``krun_log_level`` (libkrun's 0-5, default 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boxlite_core.errors import ConfigError
from boxlite_core.models import JsonValue
from boxlite_core.vmm.consolelog import CONSOLE_FIFO
from boxlite_core.vmm.spec import Capability, ChannelKind, VmSpec

from .binding import KRUN_DISK_FORMAT, KRUN_FEATURE_BLK, KRUN_KERNEL_FORMAT

#: KRUN_LOG_LEVEL_ERROR: libkrun's own messages reach the launcher log only when they matter.
DEFAULT_LOG_LEVEL = 1
#: tag libkrun reserves for its root filesystem (KRUN_FS_ROOT_TAG)
ROOT_TAG = "/dev/root"
#: the ``VmSpec.backend_options`` keys this backend reads (see the module docstring)
BACKEND_OPTIONS = frozenset({
    "krun_root", "krun_exec", "krun_env", "krun_workdir", "krun_kernel_format", "krun_log_level",
})

Call = dict[str, Any]


def _call(name: str, *args: Any, **extra: Any) -> Call:
    return {"call": name, "args": list(args), **extra}


def kernel_format(kernel: Path, options: Mapping[str, JsonValue]) -> str:
    """Which KRUN_KERNEL_FORMAT_* the kernel file is, from its first bytes.

    libkrun has no bzImage loader on x86_64; it boots an ELF vmlinux (which the guest kit
    writes, for QEMU's PVH entry too), or finds a gzip/bzip2/zstd-compressed ELF inside an
    image. An xz bzImage (Debian's default) cannot boot: say so here, not at start_enter.
    ``options["krun_kernel_format"]`` overrides the sniffing. An unreadable file plans as ELF;
    the launch then fails naming the path.
    """
    forced = options.get("krun_kernel_format")
    if forced:
        if not isinstance(forced, str) or forced not in KRUN_KERNEL_FORMAT:
            raise ConfigError(
                f"backend_options krun_kernel_format={forced!r}: use one of "
                f"{sorted(KRUN_KERNEL_FORMAT)}"
            )
        return str(forced)
    try:
        with open(kernel, "rb") as fh:
            head = fh.read(0x260)
    except OSError:
        return "elf"
    if head[:4] == b"\x7fELF":
        return "elf"
    if head[0x38:0x3C] == b"ARMd":  # arm64 Image header magic: raw, ready to load
        return "raw"
    if head[0x202:0x206] == b"HdrS":
        return _bzimage_format(kernel, head)
    return "raw"


def _bzimage_format(kernel: Path, head: bytes) -> str:
    setup_sects = head[0x1F1] or 4
    payload_offset = int.from_bytes(head[0x248:0x24C], "little")
    with open(kernel, "rb") as fh:
        fh.seek((setup_sects + 1) * 512 + payload_offset)
        magic = fh.read(6)
    for prefix, name in (
        (b"\x1f\x8b", "image_gz"),
        (b"BZh", "image_bz2"),
        (b"\x28\xb5\x2f\xfd", "image_zstd"),
    ):
        if magic.startswith(prefix):
            return name
    raise ConfigError(
        f"kernel {kernel}: an x86 bzImage whose payload libkrun cannot unpack "
        f"(magic {magic.hex()}); give libkrun the ELF vmlinux the guest kit extracts "
        "(uncompressed kernel) or a gzip/zstd bzImage"
    )


def libkrun_cmdline(cmdline: str) -> str:
    """The spec's cmdline with the console moved to libkrun's implicit virtio console (hvc0).

    libkrun has no 16550 UART for ``console=ttyS0``; its console device is virtio-console,
    which ``krun_set_console_output`` writes into the capped log writer's pipe (see
    :func:`console_fifo`), and from there into the box's console log. libkrun has no
    virtio-serial port either, so the agent serves on vsock: the core has already put
    ``boxlite.agent_vsock=<port>`` in the cmdline (this backend's channel is VSOCK).
    """
    words = [w for w in cmdline.split() if not w.startswith("console=")]
    return " ".join(["console=hvc0", *words])


def _check(spec: VmSpec) -> None:
    unknown = sorted(set(spec.backend_options) - BACKEND_OPTIONS)
    if unknown:
        raise ConfigError(
            f"backend_options {unknown[0]!r}: the libkrun backend reads only "
            f"{sorted(BACKEND_OPTIONS)}"
        )
    if spec.agent.kind is not ChannelKind.VSOCK:
        raise ConfigError(
            f"agent channel kind {spec.agent.kind.value!r}: the libkrun backend reaches the "
            "agent over vsock only (krun_add_vsock_port2)"
        )
    if spec.network:
        raise ConfigError(
            f"box {spec.box_id}: networking is not supported by the libkrun backend; "
            "boxes run with none"
        )
    if not 1 <= spec.cpus <= 255:
        raise ConfigError(f"cpus={spec.cpus}: libkrun takes 1-255 vCPUs (uint8_t)")
    tags: set[str] = set()
    for share in spec.shares:
        if share.kind != "virtiofs":
            cap = Capability.NINEP.value if share.kind == "9p" else share.kind
            raise ConfigError(
                f"share {share.tag!r}: kind {share.kind!r} needs capability {cap!r}, which the "
                "libkrun backend lacks (it has virtiofs only); use --volume-sharer virtiofs"
            )
        if share.tag == ROOT_TAG or share.tag in tags:
            raise ConfigError(f"share tag {share.tag!r} is reserved or used twice")
        tags.add(share.tag)


def _boot_calls(spec: VmSpec) -> list[Call]:
    options = spec.backend_options
    root = options.get("krun_root")
    if not root:
        fmt = kernel_format(spec.kernel, options)
        return [
            _call(
                "krun_set_kernel",
                str(spec.kernel),
                KRUN_KERNEL_FORMAT[fmt],
                str(spec.initrd),
                libkrun_cmdline(spec.cmdline),
            )
        ]
    exec_list = options.get("krun_exec") or ["/sbin/init"]
    env_map = options.get("krun_env") or {}
    if not isinstance(exec_list, list) or not isinstance(env_map, dict):
        raise ConfigError(
            "backend_options krun_exec must be a list (argv) and krun_env a mapping"
        )
    exec_argv = [str(a) for a in exec_list]
    env = [f"{k}={v}" for k, v in sorted(env_map.items())]
    calls = [_call("krun_set_root", str(root))]
    if options.get("krun_workdir"):
        calls.append(_call("krun_set_workdir", str(options["krun_workdir"])))
    # argv excludes the program: libkrun's init passes exec_path itself as argv[0].
    calls.append(_call("krun_set_exec", exec_argv[0], exec_argv[1:], env))
    return calls


def _disk_calls(spec: VmSpec) -> list[Call]:
    if not spec.disks:
        return []
    calls = [
        _call(
            "krun_has_feature",
            KRUN_FEATURE_BLK,
            if_present="krun_has_feature",
            expect=1,
            why="disks need a libkrun built with block device support (BLK=1)",
        )
    ]
    for index, disk in enumerate(spec.disks):
        block_id = disk.serial or f"disk{index}"
        path = str(disk.path)
        entry = _call(
            "krun_add_disk2", block_id, path, KRUN_DISK_FORMAT[disk.format], disk.read_only
        )
        if disk.format == "raw":  # libkrun before krun_add_disk2 opened raw images only
            entry["fallback"] = _call("krun_add_disk", block_id, path, disk.read_only)
        calls.append(entry)
    return calls


def _share_calls(spec: VmSpec) -> list[Call]:
    calls = []
    for share in spec.shares:
        # libkrun serves virtiofs itself from the host path: no virtiofsd, share.socket unused.
        if share.read_only:
            # shm_size 0 = no DAX window; only the ...3 variant carries read_only.
            calls.append(_call("krun_add_virtiofs3", share.tag, str(share.host_path), 0, True))
        else:
            calls.append(_call("krun_add_virtiofs", share.tag, str(share.host_path)))
    return calls


def _vsock_calls(spec: VmSpec) -> list[Call]:
    # The implicit vsock device enables TSI, which lets the guest open host network sockets.
    # A box has no network, so replace it with a plain vsock (no TSI flags) where we can.
    return [
        _call("krun_disable_implicit_vsock", if_present="krun_disable_implicit_vsock"),
        _call("krun_add_vsock", 0, if_present="krun_disable_implicit_vsock"),
        # listen=True: libkrun listens on the unix socket and each host connect becomes a
        # new vsock stream to the guest's agent port (the guest agent listens, the host dials).
        _call("krun_add_vsock_port2", spec.agent.vsock_port, str(spec.agent.socket), True),
    ]


def krun_calls(spec: VmSpec) -> list[Call]:
    """The ordered krun calls for ``spec``; raises ConfigError for what libkrun cannot do."""
    _check(spec)
    level = spec.backend_options.get("krun_log_level", DEFAULT_LOG_LEVEL)
    if isinstance(level, bool) or not isinstance(level, int):
        raise ConfigError(f"backend_options krun_log_level={level!r}: must be an integer 0-5")
    log_level = level
    return [
        _call("krun_set_log_level", log_level),
        _call("krun_create_ctx"),
        _call("krun_set_vm_config", spec.cpus, spec.memory_mib),
        *_boot_calls(spec),
        *_disk_calls(spec),
        *_share_calls(spec),
        *_vsock_calls(spec),
        # never the log file itself: libkrun appends whatever the guest writes, without limit.
        # The capped writer reads this named pipe into spec.console_log (see launch()).
        _call("krun_set_console_output", str(console_fifo(spec))),
        _call("krun_start_enter"),
    ]


def console_fifo(spec: VmSpec) -> Path:
    """The named pipe libkrun writes the guest console into (``BOXDIR/console.fifo``).

    Why a pipe: ``krun_set_console_output`` only takes a path, and a regular file there
    grows as fast as a root guest writes to hvc0. The box's log writer
    (:mod:`boxlite_core.vmm.logwriter` ``--fifo``) drains the pipe into ``console.log`` under
    ``VmSpec.console_log_max_bytes``, rotating to ``console.log.1`` and ``.2``."""
    return Path(spec.box_dir) / CONSOLE_FIFO
