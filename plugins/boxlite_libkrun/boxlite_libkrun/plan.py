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
layout as every other backend. ``hints["krun_root"]`` selects libkrun's other mode instead
(``krun_set_root`` a host directory + ``krun_set_exec``, booted with libkrunfw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from boxlite_core.errors import ConfigError
from boxlite_core.models import Capability, VmSpec
from boxlite_core.vmm.consolelog import CONSOLE_FIFO

from . import AGENT_PORT
from .binding import KRUN_DISK_FORMAT, KRUN_FEATURE_BLK, KRUN_KERNEL_FORMAT

#: KRUN_LOG_LEVEL_ERROR: libkrun's own messages reach the launcher log only when they matter.
DEFAULT_LOG_LEVEL = 1
#: tag libkrun reserves for its root filesystem (KRUN_FS_ROOT_TAG)
ROOT_TAG = "/dev/root"

Call = dict[str, Any]


def _call(name: str, *args: Any, **extra: Any) -> Call:
    return {"call": name, "args": list(args), **extra}


def kernel_format(kernel: Path, hints: dict[str, Any]) -> str:
    """Which KRUN_KERNEL_FORMAT_* the kernel file is, from its first bytes.

    libkrun has no bzImage loader on x86_64; it boots an ELF vmlinux (which the guest kit
    writes, for QEMU's PVH entry too), or finds a gzip/bzip2/zstd-compressed ELF inside an
    image. An xz bzImage (Debian's default) cannot boot: say so here, not at start_enter.
    ``hints["krun_kernel_format"]`` overrides the sniffing. An unreadable file plans as ELF;
    the launch then fails naming the path.
    """
    forced = hints.get("krun_kernel_format")
    if forced:
        if forced not in KRUN_KERNEL_FORMAT:
            raise ConfigError(
                f"hints.krun_kernel_format={forced!r}: use one of {sorted(KRUN_KERNEL_FORMAT)}"
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


#: cmdline key telling the guest agent (and /init) which vsock port to listen on
AGENT_CMDLINE_KEY = "boxlite.agent_vsock"


def libkrun_cmdline(cmdline: str) -> str:
    """The kit's cmdline with the console moved to libkrun's implicit virtio console (hvc0),
    and ``boxlite.agent_vsock=AGENT_PORT`` appended unless already there.

    libkrun has no 16550 UART for ``console=ttyS0``; its console device is virtio-console,
    which ``krun_set_console_output`` writes into the capped log writer's pipe (see
    :func:`console_fifo`), and from there into the box's console log. libkrun has no
    virtio-serial port either, so the agent must serve on vsock: the key tells it (and /init,
    which loads the vsock modules only then) to listen on the port ``krun_add_vsock_port2`` uses.
    """
    words = [w for w in cmdline.split() if not w.startswith("console=")]
    if not any(w.startswith(AGENT_CMDLINE_KEY + "=") for w in words):
        words.append(f"{AGENT_CMDLINE_KEY}={AGENT_PORT}")
    return " ".join(["console=hvc0", *words])


def _check(spec: VmSpec) -> None:
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
    hints = dict(spec.hints)
    root = hints.get("krun_root")
    if not root:
        fmt = kernel_format(spec.kernel, hints)
        return [
            _call(
                "krun_set_kernel",
                str(spec.kernel),
                KRUN_KERNEL_FORMAT[fmt],
                str(spec.initrd),
                libkrun_cmdline(spec.cmdline),
            )
        ]
    exec_argv = [str(a) for a in hints.get("krun_exec") or ["/sbin/init"]]
    env = [f"{k}={v}" for k, v in sorted(dict(hints.get("krun_env") or {}).items())]
    calls = [_call("krun_set_root", str(root))]
    if hints.get("krun_workdir"):
        calls.append(_call("krun_set_workdir", str(hints["krun_workdir"])))
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
        # new vsock stream to the guest's AGENT_PORT (the guest agent listens, the host dials).
        _call("krun_add_vsock_port2", AGENT_PORT, str(spec.agent.socket), True),
    ]


def krun_calls(spec: VmSpec) -> list[Call]:
    """The ordered krun calls for ``spec``; raises ConfigError for what libkrun cannot do."""
    _check(spec)
    log_level = int(dict(spec.hints).get("krun_log_level", DEFAULT_LOG_LEVEL))
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
