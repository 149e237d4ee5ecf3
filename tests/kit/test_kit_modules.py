"""Module dependency reading (ELF .modinfo), modules.dep writing and the load-order closure."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.kit import modules


def fake_module(depends: str, name: str) -> bytes:
    """A minimal ELF64 LE relocatable with .modinfo and .shstrtab, like a real .ko's."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_size = 64
    data = bytearray(header_size) + modinfo + shstrtab
    shoff = len(data)
    sections = [
        (0, 0, 0, 0),
        (1, 1, header_size, len(modinfo)),  # .modinfo (PROGBITS)
        (10, 3, header_size + len(modinfo), len(shstrtab)),  # .shstrtab (STRTAB)
    ]
    for name_off, sh_type, offset, size in sections:
        data += struct.pack("<IIQQQQIIQQ", name_off, sh_type, 0, 0, offset, size, 0, 0, 1, 0)
    data[0:16] = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    struct.pack_into(
        "<HHIQQQIHHHHHH", data, 16, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections), 2
    )
    return bytes(data)


@pytest.fixture
def module_root(tmp_path: Path) -> Path:
    tree = {
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/drivers/virtio/virtio.ko": "virtio_ring",
        "kernel/drivers/block/virtio_blk.ko": "virtio,virtio_ring",
        "kernel/net/9p/9pnet.ko": "fscache",
        "kernel/fs/fscache/fscache.ko": "netfs",
        "kernel/fs/netfs/netfs.ko": "",
        "kernel/fs/9p/9p.ko": "9pnet,netfs,fscache",
        "kernel/net/9p/9pnet_virtio.ko": "9pnet,virtio,virtio_ring",
        "kernel/drivers/gpu/unrelated-gpu.ko": "virtio",
    }
    for rel, deps in tree.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fake_module(deps, modules.module_name(rel)))
    return tmp_path


def test_read_modinfo_finds_depends(module_root: Path) -> None:
    info = modules.read_modinfo((module_root / "kernel/fs/9p/9p.ko").read_bytes())
    assert info["depends"] == ["9pnet,netfs,fscache"]
    assert info["name"] == ["9p"]


def test_written_modules_dep_lists_full_closure(module_root: Path) -> None:
    modules.write_modules_dep(module_root)
    dep = modules.parse_modules_dep((module_root / "modules.dep").read_text())
    assert set(dep["kernel/fs/9p/9p.ko"]) == {
        "kernel/net/9p/9pnet.ko",
        "kernel/fs/netfs/netfs.ko",
        "kernel/fs/fscache/fscache.ko",
    }
    assert dep["kernel/fs/netfs/netfs.ko"] == []


def test_closure_loads_dependencies_first_and_skips_unrelated(module_root: Path) -> None:
    modules.write_modules_dep(module_root)
    dep = modules.parse_modules_dep((module_root / "modules.dep").read_text())
    order = modules.module_closure(
        dep, ["9p", "9pnet_virtio", "virtio_blk", "ext4"], builtin=["kernel/fs/ext4/ext4.ko"]
    )
    assert "kernel/drivers/gpu/unrelated-gpu.ko" not in order
    assert len(order) == len(set(order)) == 8
    for path, deps in dep.items():
        if path in order:
            for d in deps:
                assert order.index(d) < order.index(path), (d, path)


def test_closure_from_depmod_style_text() -> None:
    text = (
        "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n"
        "kernel/fs/mbcache.ko:\n"
        "kernel/fs/jbd2/jbd2.ko:\n"
        "kernel/lib/crc16.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
    )
    order = modules.module_closure(modules.parse_modules_dep(text), ["ext4"])
    assert order[-1] == "kernel/fs/ext4/ext4.ko"
    assert set(order) == {
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/lib/crc16.ko",
    }


def test_missing_module_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="9p"):
        modules.module_closure({"kernel/fs/ext4/ext4.ko": []}, ["9p"])


def test_dashes_and_underscores_are_the_same_module() -> None:
    assert modules.module_name("kernel/crypto/crc32c-intel.ko") == "crc32c_intel"
    order = modules.module_closure({"kernel/crypto/crc32c-intel.ko": []}, ["crc32c_intel"])
    assert order == ["kernel/crypto/crc32c-intel.ko"]
