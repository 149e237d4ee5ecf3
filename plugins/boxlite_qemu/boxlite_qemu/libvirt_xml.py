"""A VmSpec as libvirt domain XML: pure, deterministic, no libvirt import.

Why its own module: the XML is the whole launch recipe of the libvirt backend, so tests read it
with ``xml.etree`` without a daemon, and a vendor can see exactly what libvirt is asked for.

Choices that differ from the ``qemu`` backend, and why:

* Machine: always ``q35`` (``virt`` on aarch64) with PCI virtio devices. libvirt's microvm
  support is minimal (no virtio-mmio device addressing), so the kit's ``microvm`` hint is
  overridden; the kit's kernel carries both transports and its microvm-only cmdline word
  (``tsc_early_khz=``) is harmless on q35.
* Ownership: libvirt's DAC driver chowns every disk it opens to ``libvirt-qemu`` *and does
  not give the backing files back* — that would break the shared, read-only base images
  (guest root image, the ``disk`` strategy's cached ext4). So relabelling is switched off for
  the whole domain: on a system connection QEMU runs as root (the same user the ``qemu``
  backend's QEMU would have), on a session connection as the calling user.
* No ``<interface>``, no USB, no balloon, no graphics: a box has no network and needs nothing
  but its disks, shares, agent channel and a serial console.

It also reads and rewrites the domain XML embedded in a libvirt *save image* (the file
``virDomainSaveFlags`` writes), because that is the one way to restore a saved domain as a new
box: see :func:`rebrand_save_header`.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import attrs

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.spec import ChannelKind, DiskSpec, ShareSpec, VmSpec

from .argv import NINEP_DMODE, NINEP_FMODE

#: libvirt starts this virtiofsd when a virtiofs share comes without its own socket
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: machine type per guest architecture (libvirt's arch names)
MACHINES = {"x86_64": "q35", "aarch64": "virt"}
#: domain name prefix: ``boxlite-<box_id>``, so `virsh list` shows whose VMs these are
NAME_PREFIX = "boxlite-"
#: libvirt domain types we emit: kvm (Linux HW), qemu (TCG), hvf (macOS)
DOMAIN_TYPES = ("kvm", "qemu", "hvf")
#: ``seclabel`` modes: "root" runs QEMU as uid/gid 0 with no relabel (system connection),
#: "none" leaves QEMU's user alone and relabels nothing (session connection)
SECLABEL_MODES = ("root", "none")


def domain_name(box_id: str) -> str:
    return f"{NAME_PREFIX}{box_id}"


def disk_target(index: int) -> str:
    """vda, vdb, … vdz, vdaa — the guest finds disks by serial; the name only has to be unique."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return f"vd{letters}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


@attrs.frozen
class RemoteFiles:
    """Where a remote daemon's host holds a spec's files (volumes of its storage pool, see
    libvirt_pool.py): ``kernel``, ``initrd``, and one path per ``spec.disks``, in order."""

    kernel: str
    initrd: str
    disks: tuple[str, ...] = attrs.field(converter=tuple)


def _disk(devices: ET.Element, index: int, disk: DiskSpec, source: str) -> None:
    el = _sub(devices, "disk", type="file", device="disk")
    # cache=none needs O_DIRECT, which tmpfs lacks; writeback is what the qemu backend uses too
    _sub(el, "driver", name="qemu", type=disk.format, cache="writeback", discard="unmap")
    _sub(el, "source", file=source)
    _sub(el, "target", dev=disk_target(index), bus="virtio")
    if disk.serial:
        _sub(el, "serial", disk.serial)
    if disk.read_only:
        _sub(el, "readonly")


def _share(devices: ET.Element, share: ShareSpec, virtiofsd: str, seclabel: str) -> None:
    if share.kind == "9p":
        # a writable user volume: "mapped" (QEMU's mapped-xattr), like the qemu backend —
        # guest owners, modes and device nodes stay in xattrs, so no setuid bit or device
        # node reaches the host. Read-only and rootfs shares (no owner) as before:
        # passthrough as root, squash unprivileged (see argv.ninep_security_model)
        if not share.read_only and share.uid is not None:
            el = _sub(
                devices, "filesystem", type="mount", accessmode="mapped",
                fmode=NINEP_FMODE, dmode=NINEP_DMODE,
            )
        else:
            mode = "passthrough" if seclabel == "root" else "squash"
            el = _sub(devices, "filesystem", type="mount", accessmode=mode)
        _sub(el, "driver", type="path")
        _sub(el, "source", dir=str(share.host_path))
        _sub(el, "target", dir=share.tag)
        if share.read_only:
            _sub(el, "readonly")
    elif share.kind == "virtiofs":
        el = _sub(devices, "filesystem", type="mount")
        if share.socket is not None:
            # the sharer's own virtiofsd (libvirt >= 8.5): read-only stays enforced by it
            _sub(el, "driver", type="virtiofs", queue="1024")
            _sub(el, "source", socket=str(share.socket))
        else:
            if share.read_only:
                raise ConfigError(
                    f"share {share.tag!r}: a read-only virtiofs share needs the sharer's own "
                    "virtiofsd (ShareSpec.socket); libvirt-started virtiofsd cannot be read-only"
                )
            el.set("accessmode", "passthrough")
            _sub(el, "driver", type="virtiofs", queue="1024")
            _sub(el, "binary", path=virtiofsd)
            _sub(el, "source", dir=str(share.host_path))
        _sub(el, "target", dir=share.tag)
    else:
        raise ConfigError(
            f"share {share.tag!r}: kind {share.kind!r} is not supported by the libvirt backend "
            "(it attaches '9p' and 'virtiofs'); pick another volume sharer"
        )


def _needs_shared_memory(shares: Iterable[ShareSpec]) -> bool:
    return any(s.kind == "virtiofs" for s in shares)


def build_domain_xml(
    spec: VmSpec,
    *,
    domain_type: str = "qemu",
    arch: str = "x86_64",
    seclabel: str = "root",
    virtiofsd: str = DEFAULT_VIRTIOFSD,
    console_socket: Path | None = None,
    remote: RemoteFiles | None = None,
) -> str:
    """The transient domain for ``spec``. Same arguments, same bytes.

    ``remote``: the daemon is on another host, where none of the spec's paths exist: the
    kernel, initrd and disks are the given paths of that host, the serial console is a pty
    and the agent channel a unix socket whose path libvirt chooses there (both read through
    the connection: ``virDomainOpenConsole``, ``virDomainOpenChannel``), and shares are 9p
    exports of that host's directories (``ShareSpec.host_path`` is a path there).

    ``console_socket``: serve the serial console on this unix socket (QEMU binds it; the
    core's capped writer connects and copies it into ``spec.console_log`` under the box's
    ``console_log_max_bytes``). None: a file chardev at ``spec.console_log``, written by
    virtlogd, whose cap is host-wide (``max_size`` in virtlogd.conf) — for a remote daemon,
    whose box directory is not on this host. A named pipe does not work here: libvirt
    replaces a file chardev's path with a regular file."""
    if domain_type not in DOMAIN_TYPES:
        raise ConfigError(f"libvirt domain type {domain_type!r}: must be one of {DOMAIN_TYPES}")
    if seclabel not in SECLABEL_MODES:
        raise ConfigError(f"libvirt seclabel mode {seclabel!r}: must be one of {SECLABEL_MODES}")
    machine = MACHINES.get(arch)
    if machine is None:
        raise ConfigError(f"libvirt backend: architecture {arch!r} is not supported "
                          f"(known: {', '.join(MACHINES)})")
    if spec.network:
        raise ConfigError("libvirt backend: networking is not supported; boxes run with none")
    if spec.backend_options:
        raise ConfigError(
            f"backend_options {sorted(spec.backend_options)[0]!r}: the libvirt backend reads "
            "no backend options"
        )
    if remote is not None:
        for share in spec.shares:
            if share.kind != "9p" or share.socket is not None:
                raise ConfigError(
                    f"share {share.tag!r} ({share.host_path}, {share.kind}): a remote libvirt "
                    "host shares its own directories, through its QEMU's 9p server; a "
                    "sharer process of this machine cannot serve it")
        if len(remote.disks) != len(spec.disks):
            raise ConfigError(f"remote files name {len(remote.disks)} disks, the spec has "
                              f"{len(spec.disks)}")

    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", domain_name(spec.box_id))
    if spec.name:
        _sub(dom, "title", f"boxlite box {spec.name}")
    # a remote host gets no path of ours: it could open none of them
    _sub(dom, "description", f"boxlite box {spec.box_id}" if remote
         else f"boxlite box {spec.box_id} ({spec.box_dir})")
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus), placement="static")
    if _needs_shared_memory(spec.shares):
        # vhost-user (virtiofsd) must map guest RAM: it has to be shareable memory
        mb = _sub(dom, "memoryBacking")
        _sub(mb, "source", type="memfd")
        _sub(mb, "access", mode="shared")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=arch, machine=machine)
    _sub(os_el, "kernel", remote.kernel if remote else str(spec.kernel))
    _sub(os_el, "initrd", remote.initrd if remote else str(spec.initrd))
    _sub(os_el, "cmdline", spec.cmdline)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if arch == "x86_64":
        _sub(features, "apic")
    if domain_type in ("kvm", "hvf"):
        # migratable: the host CPU minus features QEMU cannot save (invtsc), exactly the
        # qemu backend's `-cpu host`; "off" would block every save (boot templates, fork)
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    elif arch == "x86_64":
        # TCG: the qemu backend's `-cpu qemu64,+arat` (argv.TCG_X86_CPU says why)
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", "qemu64", fallback="forbid")
        _sub(cpu, "feature", policy="require", name="arat")
    _sub(dom, "clock", offset="utc")
    # a guest that powers off, reboots (panic=-1 reboot=t) or crashes is gone: the box's
    # VM ends instead of looping, exactly like the qemu backend's -no-reboot
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for index, disk in enumerate(spec.disks):
        _disk(devices, index, disk, remote.disks[index] if remote else str(disk.path))
    for share in spec.shares:
        _share(devices, share, virtiofsd, seclabel)
    _sub(devices, "controller", type="usb", model="none")
    if remote is not None:
        serial = _sub(devices, "serial", type="pty")
    elif console_socket is not None:
        serial = _sub(devices, "serial", type="unix")
        _sub(serial, "source", mode="bind", path=str(console_socket))
    else:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=str(spec.console_log))
    _sub(serial, "target", port="0")
    if spec.agent.kind is not ChannelKind.VIRTIO_SERIAL:
        raise ConfigError(
            f"libvirt backend: agent channel kind {spec.agent.kind.value!r} is not supported "
            "(it maps the agent socket through a virtio-serial port)"
        )
    channel = _sub(devices, "channel", type="unix")
    if remote is not None:
        _sub(channel, "source", mode="bind")  # libvirt names the socket on its host
    else:
        _sub(channel, "source", mode="bind", path=str(spec.agent.socket))
    _sub(channel, "target", type="virtio", name=spec.agent.port_name)
    _sub(devices, "memballoon", model="none")

    if seclabel == "root":
        label = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
        _sub(label, "label", "+0:+0")
    else:
        _sub(dom, "seclabel", type="none", model="dac")

    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def disk_sources(xml: str) -> dict[str, Path]:
    """``{serial: source file}`` of a domain XML's file disks that have a serial."""
    found: dict[str, Path] = {}
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        serial, source = disk.findtext("serial"), disk.find("source")
        if serial and source is not None and source.get("file"):
            found[serial] = Path(source.get("file", ""))
    return found


def bound_sockets(xml: str) -> list[Path]:
    """The unix sockets a domain's QEMU listens on (serial, console, channels in bind mode):
    what a restore must find free, like a launch."""
    found: list[Path] = []
    devices = ET.fromstring(xml).find("devices")
    for dev in devices if devices is not None else ():
        source = dev.find("source")
        if (dev.tag in ("serial", "console", "channel") and dev.get("type") == "unix"
                and source is not None and source.get("mode") == "bind" and source.get("path")):
            path = Path(source.get("path", ""))
            if path not in found:
                found.append(path)
    return found


# -- the domain XML inside a libvirt save image ------------------------------------------------

#: header of a libvirt QEMU save image (src/qemu/qemu_saveimage.h, virQEMUSaveHeader, version
#: 2, unchanged since libvirt 0.9.x): magic, version, data_len, was_running, compressed,
#: cookieOffset, 14 unused u32, in the host's byte order. ``data_len`` bytes follow: the
#: domain XML and the cookie, each NUL-terminated, then zeros (libvirt leaves ~64 KiB of room
#: so the XML can be rewritten in place); QEMU's migration stream starts after them.
SAVE_HEADER = struct.Struct("=16sIIIII56s")
SAVE_MAGIC = b"LibvirtQemudSave"
#: the magic of an image libvirt had not finished writing
SAVE_MAGIC_PARTIAL = b"LibvirtQemudPart"
SAVE_VERSION = 2
_NAME_RE = re.compile(r"<name>[^<]*</name>")
_UUID_RE = re.compile(r"<uuid>[^<]*</uuid>")


class SaveImageError(ValueError):
    """A libvirt save image whose header or embedded XML is not what libvirt writes."""


def with_uuid(xml: str, uuid: str) -> str:
    """``xml`` (from :func:`build_domain_xml`) with ``<uuid>uuid</uuid>`` after ``<name>``.

    Why: a restore's new XML must carry the UUID the save image was rebranded to (libvirt
    checks the two are equal), while a plan stays the same bytes for the same spec."""
    root = ET.fromstring(xml)
    for old in root.findall("uuid"):
        root.remove(old)
    el = ET.Element("uuid")
    el.text = uuid
    names = [i for i, child in enumerate(root) if child.tag == "name"]
    root.insert(names[0] + 1 if names else 0, el)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def save_data_length(header: bytes) -> int:
    """How many bytes of a save image hold libvirt's header, XML and cookie: the QEMU stream
    starts there. ``header`` is the image's first :data:`SAVE_HEADER` ``.size`` bytes.

    Raises:
        SaveImageError: not a complete libvirt save image of a version this code knows.
    """
    if len(header) < SAVE_HEADER.size:
        raise SaveImageError(f"{len(header)} bytes, shorter than libvirt's save header")
    magic, version, data_len, _running, _compressed, cookie, _unused = SAVE_HEADER.unpack(
        header[:SAVE_HEADER.size])
    if magic == SAVE_MAGIC_PARTIAL:
        raise SaveImageError("libvirt had not finished writing it (magic LibvirtQemudPart)")
    if magic != SAVE_MAGIC:
        raise SaveImageError(f"magic {magic[:16]!r} is not libvirt's {SAVE_MAGIC!r}")
    if version != SAVE_VERSION:
        raise SaveImageError(f"save image version {version}, this code reads {SAVE_VERSION}")
    if not 0 < cookie <= data_len or data_len > 16 * 1024 * 1024:
        raise SaveImageError(f"cookie offset {cookie} / data length {data_len} are not sane")
    return SAVE_HEADER.size + data_len


def rebrand_save_header(head: bytes, name: str, uuid: str) -> bytes:
    """The first :func:`save_data_length` bytes of a save image, with the embedded domain's
    ``<name>`` and ``<uuid>`` replaced; same length, so the QEMU stream after them is kept.

    Why: ``virDomainRestoreFlags`` takes a new XML only where the guest cannot tell
    (disk and socket paths) and refuses another name or UUID ("Target domain name 'B' does not
    match source 'A'", "Target domain uuid ... does not match source ..."; libvirt 9.0), and
    ``virDomainSaveImageDefineXML`` checks the same. A box restored from a template or a
    snapshot is a new domain that may run beside the one that saved it, so it needs its own
    name and UUID: the restore runs from a private copy of the image with this header.

    Raises:
        SaveImageError: ``head`` is not a libvirt save header + data, or its XML has no
            name/uuid, or the new XML does not fit in libvirt's padding.
    """
    total = save_data_length(head)
    if len(head) < total:
        raise SaveImageError(f"{len(head)} bytes, the header says {total}")
    magic, version, data_len, running, compressed, cookie_at, unused = SAVE_HEADER.unpack(
        head[:SAVE_HEADER.size])
    data = head[SAVE_HEADER.size:total]
    try:
        xml = data[:cookie_at].rstrip(b"\0").decode()
    except UnicodeDecodeError as exc:
        raise SaveImageError(f"its domain XML is not UTF-8: {exc}") from None
    cookie = data[cookie_at:].split(b"\0", 1)[0]
    try:
        ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SaveImageError(f"its domain XML does not parse: {exc}") from None
    if not _NAME_RE.search(xml) or not _UUID_RE.search(xml):
        raise SaveImageError("its domain XML has no <name> or <uuid>")
    xml = _NAME_RE.sub(f"<name>{name}</name>", xml, count=1)
    xml = _UUID_RE.sub(f"<uuid>{uuid}</uuid>", xml, count=1)
    new_xml = xml.encode() + b"\0"
    body = new_xml + cookie + b"\0"
    if len(body) > data_len:
        raise SaveImageError(f"the renamed XML needs {len(body)} bytes, the image has "
                             f"{data_len}")
    header = SAVE_HEADER.pack(magic, version, data_len, running, compressed, len(new_xml),
                              unused)
    return header + body + b"\0" * (data_len - len(body))
