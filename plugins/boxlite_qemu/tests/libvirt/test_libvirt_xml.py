"""The libvirt plan without a daemon: the domain XML read back with xml.etree."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs
import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.spec import Capability, DiskSpec, ShareSpec
from boxlite_qemu.libvirt_backend import LibvirtBackend
from boxlite_qemu.libvirt_xml import build_domain_xml, disk_target


def _full_spec(tmp_path: Path, make_spec):
    return make_spec(
        tmp_path,
        disks=(DiskSpec(tmp_path / "rootfs.qcow2", "qcow2", serial="bxrootfs"),),
        shares=(
            ShareSpec("vol0", tmp_path / "ro", "9p", read_only=True),
            ShareSpec("vol1", tmp_path / "rw", "9p", uid=1000, gid=1000),  # a user volume
            ShareSpec("vol2", tmp_path / "fs", "virtiofs", read_only=True,
                      socket=tmp_path / "vfs2.sock"),
        ),
    )


def _tcg() -> LibvirtBackend:
    return LibvirtBackend("qemu:///system", domain_type="qemu", arch="x86_64")


def _xml(backend: LibvirtBackend, spec) -> ET.Element:
    plan = backend.plan(spec)
    assert plan.backend == "libvirt"
    return ET.fromstring(plan.data["xml"])


def test_domain_basics_follow_the_spec(tmp_path: Path, make_spec) -> None:
    spec = make_spec(tmp_path, memory_mib=384, cpus=1, cmdline="console=ttyS0 tsc_early_khz=1")
    dom = _xml(_tcg(), spec)
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "boxlite-b0x1d"
    mem = dom.find("memory")
    assert (mem.text, mem.get("unit")) == ("384", "MiB")
    assert dom.findtext("vcpu") == "1"
    # microvm hint → q35: libvirt cannot address virtio-mmio devices
    assert dom.find("os/type").get("machine") == "q35"
    assert dom.findtext("os/kernel") == "/k/vmlinux"
    assert dom.findtext("os/initrd") == "/k/initrd.img"
    assert dom.findtext("os/cmdline") == "console=ttyS0 tsc_early_khz=1"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert dom.findtext(event) == "destroy"
    assert dom.find("devices/interface") is None
    assert dom.find("devices/graphics") is None
    assert dom.find("devices/memballoon").get("model") == "none"
    assert dom.find("memoryBacking") is None  # only virtiofs needs shared memory
    serial = dom.find("devices/serial")
    # a local daemon serves the console on a socket the core's capped writer copies into
    # console.log (console_log_max_bytes holds, not virtlogd's host-wide size)
    assert serial.get("type") == "unix"
    assert serial.find("source").get("mode") == "bind"
    assert serial.find("source").get("path") == str(tmp_path / "console.sock")


def test_a_remote_plan_needs_the_files_it_uploads(tmp_path: Path, make_spec) -> None:
    """A remote daemon gets our files as pool volumes named by content (see
    test_libvirt_remote_plan.py): a file that cannot be read fails the plan, naming it."""
    with pytest.raises(ConfigError, match="cannot read /k/vmlinux"):
        LibvirtBackend("qemu+ssh://vendor.example/system", domain_type="qemu",
                       arch="x86_64").plan(make_spec(tmp_path))


def test_disks_carry_serial_format_and_readonly(tmp_path: Path, make_spec) -> None:
    dom = _xml(_tcg(), _full_spec(tmp_path, make_spec))
    disks = dom.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert all(d.find("target").get("bus") == "virtio" for d in disks)
    root, rootfs = disks
    assert root.findtext("serial") == "bxguest"
    assert root.find("driver").get("type") == "raw"
    assert root.find("readonly") is not None
    assert root.find("source").get("file") == "/k/root.ext4"
    assert rootfs.findtext("serial") == "bxrootfs"
    assert rootfs.find("driver").get("type") == "qcow2"
    assert rootfs.find("readonly") is None


def test_agent_channel_is_a_virtio_serial_port_on_the_box_socket(tmp_path: Path, make_spec) -> None:
    dom = _xml(_tcg(), make_spec(tmp_path))
    (channel,) = dom.findall("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").attrib == {"mode": "bind",
                                             "path": str(tmp_path / "agent.port")}
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.boxlite.agent"}


def test_shares_9p_and_virtiofs_external_socket(tmp_path: Path, make_spec) -> None:
    dom = _xml(_tcg(), _full_spec(tmp_path, make_spec))
    fss = {fs.find("target").get("dir"): fs for fs in dom.findall("devices/filesystem")}
    assert set(fss) == {"vol0", "vol1", "vol2"}
    ro9p, rw9p, vfs = fss["vol0"], fss["vol1"], fss["vol2"]
    assert ro9p.get("accessmode") == "passthrough"  # QEMU as root, nothing written
    # writable: mapped-xattr, so no guest mode bit, owner or device node reaches the host
    assert (rw9p.get("accessmode"), rw9p.get("fmode"), rw9p.get("dmode")) == (
        "mapped", "0644", "0755"
    )
    for fs in (ro9p, rw9p):
        assert fs.find("driver").get("type") == "path"
    assert ro9p.find("readonly") is not None
    assert rw9p.find("readonly") is None
    assert ro9p.find("source").get("dir") == str(tmp_path / "ro")
    assert vfs.find("driver").get("type") == "virtiofs"
    assert vfs.find("source").attrib == {"socket": str(tmp_path / "vfs2.sock")}
    assert vfs.find("binary") is None  # the sharer's virtiofsd, not one libvirt starts
    assert dom.find("memoryBacking/source").get("type") == "memfd"
    assert dom.find("memoryBacking/access").get("mode") == "shared"


def test_virtiofs_without_socket_lets_libvirt_start_virtiofsd(tmp_path: Path, make_spec) -> None:
    spec = make_spec(tmp_path, shares=(ShareSpec("vol0", tmp_path / "d", "virtiofs"),))
    dom = _xml(_tcg(), spec)
    fs = dom.find("devices/filesystem")
    assert fs.find("binary").get("path") == "/usr/lib/qemu/virtiofsd"
    assert fs.find("source").get("dir") == str(tmp_path / "d")
    ro = make_spec(tmp_path, shares=(ShareSpec("vol0", tmp_path / "d", "virtiofs",
                                               read_only=True),))
    with pytest.raises(ConfigError, match="read-only virtiofs"):
        build_domain_xml(ro)


def test_unknown_share_kind_is_a_config_error(tmp_path: Path, make_spec) -> None:
    spec = make_spec(tmp_path, shares=(ShareSpec("vol0", tmp_path, "nfs"),))
    with pytest.raises(ConfigError, match="'nfs'"):
        build_domain_xml(spec)


def test_seclabel_keeps_libvirt_from_chowning_shared_images(tmp_path: Path, make_spec) -> None:
    system = _xml(_tcg(), make_spec(tmp_path))
    label = system.find("seclabel")
    assert label.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == "+0:+0"
    session = _xml(LibvirtBackend("qemu:///session", domain_type="qemu"), make_spec(tmp_path))
    assert session.find("seclabel").attrib == {"type": "none", "model": "dac"}
    spec = make_spec(tmp_path, shares=(ShareSpec("vol0", tmp_path, "9p", uid=7, gid=7),))
    session9p = _xml(LibvirtBackend("qemu:///session", domain_type="qemu"), spec)
    assert session9p.find("devices/filesystem").get("accessmode") == "mapped"  # a user volume
    for share in (ShareSpec("vol0", tmp_path, "9p", read_only=True, uid=7, gid=7),
                  ShareSpec("rootfs", tmp_path, "9p")):  # read-only; a rootfs share
        session9p = _xml(LibvirtBackend("qemu:///session", domain_type="qemu"),
                         make_spec(tmp_path, shares=(share,)))
        assert session9p.find("devices/filesystem").get("accessmode") == "squash", share


def test_domain_type_follows_the_accelerator_probe(tmp_path: Path, make_spec) -> None:
    from boxlite_qemu.accel import host_accel

    backend = LibvirtBackend("qemu:///system")
    expected = {"kvm": "kvm", "hvf": "hvf"}.get(host_accel().accel, "qemu")
    plan = backend.plan(make_spec(tmp_path))
    assert plan.data["domain_type"] == expected
    assert ET.fromstring(plan.data["xml"]).get("type") == expected
    kvm = _xml(LibvirtBackend("qemu:///system", domain_type="kvm"), make_spec(tmp_path))
    assert kvm.get("type") == "kvm"
    assert kvm.find("cpu").get("mode") == "host-passthrough"


def test_domain_type_is_qemu_when_kvm_is_unusable(tmp_path: Path, monkeypatch, make_spec) -> None:
    monkeypatch.setenv("BOXLITE_ACCEL", "tcg")  # the qemu backend's override: KVM unusable
    dom = _xml(LibvirtBackend("qemu:///system"), make_spec(tmp_path))
    assert dom.get("type") == "qemu"
    # TCG: QEMU's default model plus ARAT, as the qemu backend's -cpu (high-resolution timers)
    cpu = dom.find("cpu")
    assert cpu.get("mode") == "custom" and cpu.findtext("model") == "qemu64"
    assert [(f.get("name"), f.get("policy")) for f in cpu.findall("feature")] == [
        ("arat", "require")]


def test_plan_is_deterministic_and_json_serialisable(tmp_path: Path, make_spec) -> None:
    a = _tcg().plan(_full_spec(tmp_path, make_spec))
    b = _tcg().plan(_full_spec(tmp_path, make_spec))
    assert a.to_json() == b.to_json()
    data = json.loads(a.to_json())["data"]
    assert data["uri"] == "qemu:///system"
    assert data["name"] == "boxlite-b0x1d"
    assert "q35" in data["machine_note"]


def test_uri_from_environment(monkeypatch, tmp_path: Path, make_spec) -> None:
    monkeypatch.setenv("BOXLITE_LIBVIRT_URI", "qemu:///session")
    plan = LibvirtBackend(domain_type="qemu").plan(make_spec(tmp_path))
    assert plan.data["uri"] == "qemu:///session"
    monkeypatch.setenv("BOXLITE_LIBVIRT_URI", "qemu+ssh://h/system")
    assert LibvirtBackend(domain_type="qemu").remote_host == "qemu+ssh://h/system"


def test_disk_target_names() -> None:
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_backend_options_are_refused(make_spec, tmp_path: Path) -> None:
    spec = attrs.evolve(make_spec(tmp_path), backend_options={"tcg_tb_size_mib": 64})
    with pytest.raises(ConfigError, match="'tcg_tb_size_mib'"):
        build_domain_xml(spec)


def test_capabilities_never_raise_on_a_bad_accel_setting(monkeypatch) -> None:
    """capabilities() backs `boxlite backends` and every start: a typo in BOXLITE_ACCEL
    falls back to TCG with the reason, as the qemu backend does, instead of raising."""
    monkeypatch.setenv("BOXLITE_ACCEL", "bogus")
    backend = LibvirtBackend("qemu:///system")
    caps = backend.capabilities()
    assert Capability.TCG in caps and Capability.KVM not in caps
    assert backend.domain_type == "qemu"
    assert "BOXLITE_ACCEL" in backend._domain_type_reason
