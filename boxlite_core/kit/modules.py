"""Kernel modules: read their dependencies and pick the closure the guest must load.

Why not `depmod`: Debian's kernel .deb ships no modules.dep, and kmod is not installed on every
build host (busybox's depmod is a partial one). Each .ko already records the modules it needs
in its `.modinfo` ELF section (`depends=a,b`), which is exactly what modules.dep is built from,
so we read that with a few lines of ELF parsing and write a standard modules.dep ourselves.
Debian 12 ships modules uncompressed (CONFIG_MODULE_COMPRESS_NONE=y); `.ko.xz` is read too.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import ImageError

#: Modules the guest needs, by module name (dashes and underscores are equivalent).
#: Transports for both machine types are included (virtio_mmio for microvm, virtio_pci for
#: q35) so one initramfs serves either; loading the unused one costs a few ms.
#: crc32c_generic is requested by ext4/jbd2 through the crypto API at mount time (no symbol
#: dependency, so the closure cannot find it) and there is no modprobe for request_module().
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
    "overlay",
    "9p",
    "9pnet_virtio",
    "fuse",
    "virtiofs",
    # vsock: the agent's channel under libkrun/hvf (see VSOCK_MODULES)
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    # box networking (agent/network.py): a dummy device and the nftables redirect that hands
    # the container's connections to the agent. Loaded at every boot (~one template for
    # boxes with and without a network); a guest without a policy never configures them.
    "dummy",
    "nf_tables",
    "nft_chain_nat",
    "nft_redir",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
)

#: The guest end of virtio-vsock. libkrun and hvf have no virtio-serial port, so the agent
#: serves on vsock there; /init loads these only when the cmdline carries
#: ``boxlite.agent_vsock=PORT`` (proto/wire.py AGENT_VSOCK_CMDLINE_KEY; the core adds it for a
#: vsock channel), so QEMU boots pay nothing for them.
VSOCK_MODULES: frozenset[str] = frozenset(
    {"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"}
)


def module_name(path: str | Path) -> str:
    """`kernel/fs/9p/9p.ko` → `9p`; dashes become underscores like the kernel does."""
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """Return the `.modinfo` section of an ELF64 little-endian module as key → values."""
    if data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("kernel module is not an ELF64 little-endian object")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = e_shoff + index * e_shentsize
        name_off = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name_off, offset, size

    _, str_off, _ = section(e_shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] != b".modinfo":
            continue
        for item in data[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def scan_modules(module_root: Path) -> dict[str, list[str]]:
    """Map each module's relative path (under lib/modules/VERSION) to its dependencies' names."""
    result: dict[str, list[str]] = {}
    for path in sorted(module_root.rglob("*.ko*")):
        if not path.is_file():
            continue
        info = read_modinfo(path.read_bytes())
        deps = [d for value in info.get("depends", []) for d in value.split(",") if d]
        result[path.relative_to(module_root).as_posix()] = deps
    return result


def write_modules_dep(module_root: Path) -> Path:
    """Write a modules.dep (the format depmod writes) for the modules under `module_root`.

    Each line is `path: dep-path dep-path ...` with the FULL transitive closure, deepest last,
    so busybox modprobe or a plain reader can load right to left.
    """
    direct = scan_modules(module_root)
    by_name = {module_name(p): p for p in direct}
    lines = []
    for path in direct:
        closure = _closure_paths([path], direct, by_name)
        deps = [p for p in reversed(closure) if p != path]
        lines.append(f"{path}: {' '.join(deps)}".rstrip() + "\n")
    target = module_root / "modules.dep"
    target.write_text("".join(lines))
    return target


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse modules.dep text into path → dependency paths (as listed)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path.strip()] = rest.split()
    return deps


def _closure_paths(
    roots: Iterable[str], deps: Mapping[str, list[str]], by_name: Mapping[str, str]
) -> list[str]:
    """Post-order walk: every module appears after all modules it depends on."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(by_name.get(module_name(dep), dep))
        order.append(path)

    for root in roots:
        visit(root)
    return order


def module_closure(
    modules_dep: Mapping[str, list[str]],
    wanted: Iterable[str],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Relative paths of `wanted` modules and everything they need, in load order.

    `builtin` holds names (or paths from modules.builtin) compiled into the kernel: asking for
    one is fine and loads nothing. A wanted module that is neither raises ImageError, because a
    guest kernel without e.g. 9p would fail much later and far less clearly.
    """
    by_name = {module_name(p): p for p in modules_dep}
    builtin_names = {module_name(b) for b in builtin}
    roots = []
    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            roots.append(by_name[key])
        elif key not in builtin_names:
            raise ImageError(
                f"kernel module {name!r} is neither a module nor built in; "
                "pick a kernel package that has it"
            )
    return _closure_paths(roots, modules_dep, by_name)


def split_vsock(order: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a load order into (always loaded, loaded only for a vsock agent), order kept.

    Safe by name: no base module depends on a vsock one, and anything else a vsock module
    needs stays in the first list, which /init loads earlier.
    """
    always = [p for p in order if module_name(p) not in VSOCK_MODULES]
    vsock = [p for p in order if module_name(p) in VSOCK_MODULES]
    return always, vsock
