"""The plan of a box on a remote libvirt host, without a daemon: which files become which
volumes, and a domain XML that names nothing of this machine."""

from __future__ import annotations

import hashlib
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError, UnsupportedError
from boxlite_core.plugins import PluginRegistry
from boxlite_core.tools import require_tool
from boxlite_core.vmm.spec import DiskSpec, ShareSpec
from boxlite_qemu import libvirt_remote
from boxlite_qemu.libvirt_backend import LibvirtBackend

REMOTE = "qemu+ssh://me@far.example/system"


def _files(tmp_path: Path) -> dict[str, Path]:
    kit = tmp_path / "kit"
    kit.mkdir()
    out = {}
    for name, data in (("vmlinux", b"kernel"), ("initrd.img", b"initrd"),
                       ("root.ext4", b"guest root")):
        (kit / name).write_bytes(data)
        out[name] = kit / name
    base = tmp_path / "cache" / "base.ext4"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 65536)
    overlay = tmp_path / "box" / "rootfs.qcow2"
    overlay.parent.mkdir()
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(base), str(overlay), "64M"], check=True, timeout=60)
    out["base"], out["overlay"] = base, overlay
    return out


def _remote_spec(tmp_path: Path, make_spec, **kw):
    f = _files(tmp_path)
    spec = make_spec(tmp_path / "box", kernel=f["vmlinux"], initrd=f["initrd.img"],
                     root_image=f["root.ext4"],
                     disks=(DiskSpec(f["overlay"], "qcow2", serial="bxrootfs"),), **kw)
    return spec, f


def _sha(path: Path) -> str:
    return "sha256-" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_become_content_volumes_and_the_disk_a_box_volume(tmp_path, make_spec):
    spec, f = _remote_spec(tmp_path, make_spec)
    layout = libvirt_remote.layout(spec)
    assert {u.volume for u in layout.uploads} == {
        _sha(f["vmlinux"]), _sha(f["initrd.img"]), _sha(f["root.ext4"]), _sha(f["base"])}
    (overlay,) = layout.overlays
    assert overlay.volume == f"box-{spec.box_id}-bxrootfs.qcow2"
    assert overlay.backing == _sha(f["base"]) and overlay.capacity == 64 * 2**20
    assert layout.files.kernel == f"{layout.pool_path}/{_sha(f['vmlinux'])}"
    assert layout.files.disks == (f"{layout.pool_path}/{_sha(f['root.ext4'])}",
                                  f"{layout.pool_path}/{overlay.volume}")
    assert libvirt_remote.RemoteLayout.from_json(layout.to_json()) == layout


def test_equal_content_is_one_volume(tmp_path, make_spec):
    spec, f = _remote_spec(tmp_path, make_spec)
    f["initrd.img"].write_bytes(b"kernel")  # the same bytes as the kernel
    assert len({u.volume for u in libvirt_remote.layout(spec).uploads}) == 3


def test_remote_xml_names_no_path_of_this_machine(tmp_path, make_spec):
    spec, _ = _remote_spec(tmp_path, make_spec,
                           shares=(ShareSpec("uservol0", Path("/srv/data"), "9p"),))
    backend = LibvirtBackend(REMOTE, domain_type="qemu", arch="x86_64")
    plan = backend.plan(spec)
    xml = str(plan.data["xml"])
    assert str(tmp_path) not in xml
    root = ET.fromstring(xml)
    assert root.findtext("os/kernel", "").startswith("/var/lib/libvirt/boxlite/sha256-")
    assert root.find("devices/serial").get("type") == "pty"
    channel = root.find("devices/channel/source")
    assert channel is not None and channel.get("path") is None
    assert root.find("devices/filesystem/source").get("dir") == "/srv/data"
    assert plan.data["remote"]["pool"] == "boxlite"
    assert backend.plan(spec).data == plan.data  # same spec, same plan


def test_pool_env_moves_every_path(tmp_path, make_spec, monkeypatch):
    monkeypatch.setenv("BOXLITE_LIBVIRT_POOL", "mine")
    monkeypatch.setenv("BOXLITE_LIBVIRT_POOL_PATH", "/data/pool")
    spec, _ = _remote_spec(tmp_path, make_spec)
    layout = libvirt_remote.layout(spec)
    assert layout.pool == "mine"
    assert all(p.startswith("/data/pool/") for p in (layout.files.kernel, *layout.files.disks))


@pytest.mark.parametrize("kind", ["raw writable", "qcow2 over qcow2", "qcow2 alone"])
def test_disks_that_cannot_move_are_refused_by_name(tmp_path, make_spec, kind):
    spec, f = _remote_spec(tmp_path, make_spec)
    qemu_img = require_tool("qemu-img")
    if kind == "raw writable":
        disk = DiskSpec(f["base"], "raw", serial="scratch")
    elif kind == "qcow2 over qcow2":
        top = tmp_path / "top.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(f["overlay"]), str(top)], check=True, timeout=60)
        disk = DiskSpec(top, "qcow2", serial="scratch")
    else:
        alone = tmp_path / "alone.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(alone), "16M"],
                       check=True, timeout=60)
        disk = DiskSpec(alone, "qcow2", serial="scratch")
    spec = make_spec(tmp_path / "box", kernel=spec.kernel, initrd=spec.initrd,
                     root_image=f["root.ext4"], disks=(disk,))
    with pytest.raises(ConfigError, match="disk scratch"):
        LibvirtBackend(REMOTE, domain_type="qemu").plan(spec)


def test_a_share_served_by_a_process_here_is_refused(tmp_path, make_spec):
    spec, _ = _remote_spec(tmp_path, make_spec, shares=(
        ShareSpec("uservol0", Path("/srv"), "virtiofs", socket=tmp_path / "vfs.sock"),))
    with pytest.raises(ConfigError, match="9p server"):
        LibvirtBackend(REMOTE, domain_type="qemu").plan(spec)


def test_digest_cache_follows_the_content(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = libvirt_remote.cached_digest(path)
    assert first == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    os.utime(path, ns=(1, 1))
    assert libvirt_remote.cached_digest(path) == hashlib.sha256(b"two!").hexdigest()


def test_remote_capabilities_and_host(tmp_path):
    remote = LibvirtBackend(REMOTE, domain_type="qemu")
    caps = {c.value for c in remote.capabilities()}
    assert "snapshot" not in caps and "virtiofs" not in caps and "9p" in caps
    assert remote.remote_host == REMOTE
    assert LibvirtBackend("qemu:///system", domain_type="qemu").remote_host == ""
    with pytest.raises(ConfigError, match="libvirt URI"):
        remote.for_host("far.example")


def test_registry_makes_one_instance_per_host_and_refuses_local_only_backends():
    registry = PluginRegistry()
    if "libvirt" not in registry.backend_names():
        pytest.skip("the libvirt backend is not installed")
    one = registry.backend("libvirt", REMOTE)
    assert registry.backend("libvirt", REMOTE) is one and one.remote_host == REMOTE
    assert registry.backend("libvirt", None) is not one
    with pytest.raises(UnsupportedError, match="this machine only"):
        registry.backend("qemu", REMOTE)
    probe = registry.probe("qemu", REMOTE)
    assert not probe.available and "this machine only" in probe.reason
