"""plan(): the QEMU argv for a spec, checked without booting anything."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.spec import (
    AgentChannel,
    ChannelKind,
    DiskSpec,
    GuestHints,
    ShareSpec,
    VmSpec,
)
from boxlite_qemu.argv import QemuHost
from boxlite_qemu.backend import QemuBackend

HOST = QemuHost(binary="/usr/bin/qemu-system-x86_64", arch="x86_64", accel="tcg", sandbox=True)


def make_spec(box: Path, *, machine: str = "microvm", shares=(), disks=None, **kw) -> VmSpec:
    globals_ = ("virtio-mmio.force-legacy=false",) if machine == "microvm" else ()
    return VmSpec(
        box_id="box1",
        box_dir=box,
        cpus=1,
        memory_mib=256,
        kernel=Path("/kit/vmlinux"),
        initrd=Path("/kit/initrd.img"),
        cmdline="console=ttyS0 quiet",
        console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=disks if disks is not None else (
            DiskSpec(Path("/kit/guest-root.ext4"), "raw", read_only=True, serial="bxguest"),
            DiskSpec(box / "rootfs.qcow2", "qcow2", serial="bxroot"),
        ),
        shares=tuple(shares),
        guest=GuestHints(machine=machine, qemu_globals=globals_),
        **kw,
    )


def argv_of(spec: VmSpec, host: QemuHost = HOST) -> list[str]:
    return list(QemuBackend(host).plan(spec).data["argv"])


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_uses_mmio_devices(tmp_path: Path) -> None:
    argv = argv_of(make_spec(tmp_path, machine="microvm"))
    devices = values(argv, "-device")
    assert values(argv, "-machine") == ["microvm,isa-serial=on"]
    assert "virtio-blk-device,drive=disk0,serial=bxguest" in devices
    assert "virtio-serial-device" in devices
    assert not any("-pci" in d for d in devices)
    assert values(argv, "-global") == ["virtio-mmio.force-legacy=false"]


def test_q35_uses_pci_devices(tmp_path: Path) -> None:
    argv = argv_of(make_spec(tmp_path, machine="q35"))
    devices = values(argv, "-device")
    assert values(argv, "-machine") == ["q35"]
    assert "virtio-blk-pci,drive=disk1,serial=bxroot" in devices
    assert "virtio-serial-pci" in devices
    assert not any(d.endswith("-device") or "-device," in d for d in devices)


def test_vm_generation_id_where_the_machine_lists_it_in_acpi(tmp_path: Path) -> None:
    # a restored guest sees a new generation ID and reseeds; microvm's ACPI has no vmgenid
    assert "vmgenid,guid=auto" in values(argv_of(make_spec(tmp_path, machine="q35")), "-device")
    assert not any("vmgenid" in d for d in values(argv_of(make_spec(tmp_path)), "-device"))


def test_essentials_no_network_no_defaults(tmp_path: Path) -> None:
    argv = argv_of(make_spec(tmp_path))
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert values(argv, "-nic") == ["none"]
    assert not any("user," in v for v in values(argv, "-netdev") + values(argv, "-nic"))
    assert values(argv, "-kernel") == ["/kit/vmlinux"]
    assert values(argv, "-initrd") == ["/kit/initrd.img"]
    assert values(argv, "-append") == ["console=ttyS0 quiet"]
    assert values(argv, "-m") == ["256M"]
    assert values(argv, "-smp") == ["1"]
    assert values(argv, "-accel") == ["tcg"]
    # QMP as a chardev + monitor (the long form of -qmp): launch passes it a bound socket
    assert f"socket,id=qmp,path={tmp_path}/qmp.sock,server=on,wait=off" in values(
        argv, "-chardev")
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    listen = QemuBackend(HOST).plan(make_spec(tmp_path)).data["listen"]
    assert listen == [f"{tmp_path}/console.sock", f"{tmp_path}/qmp.sock",
                      f"{tmp_path}/agent.port"]
    assert values(argv, "-pidfile") == [f"{tmp_path}/qemu.pid"]
    assert f"socket,id=console,path={tmp_path}/console.sock,server=on,wait=on" in values(
        argv, "-chardev")
    assert values(argv, "-serial") == ["chardev:console"]
    assert values(argv, "-sandbox")[0].startswith("on,")
    assert "spawn=deny" in values(argv, "-sandbox")[0]


def test_no_sandbox_when_qemu_lacks_it(tmp_path: Path) -> None:
    host = QemuHost(binary="/q", sandbox=False)
    assert "-sandbox" not in argv_of(make_spec(tmp_path), host)


def test_kvm_gets_host_cpu(tmp_path: Path) -> None:
    argv = argv_of(make_spec(tmp_path), QemuHost(binary="/q", accel="kvm"))
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-cpu") == ["host"]


def test_tcg_x86_cpu_has_arat(tmp_path: Path) -> None:
    # without ARAT the guest cannot run high-resolution timers (argv.TCG_X86_CPU)
    assert values(argv_of(make_spec(tmp_path), QemuHost(binary="/q")), "-cpu") == [
        "qemu64,+arat"]


def test_tcg_multi_thread_for_smp(tmp_path: Path) -> None:
    spec = attrs.evolve(make_spec(tmp_path), cpus=2)
    assert values(argv_of(spec), "-accel") == ["tcg,thread=multi"]


def test_disks_readonly_and_format(tmp_path: Path) -> None:
    drives = values(argv_of(make_spec(tmp_path)), "-drive")
    assert drives[0].startswith("file=/kit/guest-root.ext4,format=raw,if=none,id=disk0,")
    assert "readonly=on" in drives[0]
    assert "format=qcow2" in drives[1] and "readonly=off" in drives[1]


def test_commas_in_paths_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    spec = make_spec(tmp_path, disks=(DiskSpec(odd / "d.qcow2"),))
    drive = values(argv_of(spec), "-drive")[0]
    assert drive.startswith(f"file={tmp_path}/a,,b/d.qcow2,")


def test_ninep_share_readonly(tmp_path: Path) -> None:
    shares = [
        ShareSpec("vol0", tmp_path / "ro", "9p", read_only=True),
        ShareSpec("vol1", tmp_path / "rw", "9p", read_only=False, uid=1000, gid=1000),
        ShareSpec("rootfs", tmp_path / "rootfs", "9p", read_only=False),
    ]
    argv = argv_of(make_spec(tmp_path, shares=shares))
    fsdevs = values(argv, "-fsdev")
    assert fsdevs[0] == f"local,id=fs0,path={tmp_path}/ro,security_model=passthrough,readonly=on"
    # a writable user volume: owners, modes and device nodes stay in xattrs (no setuid bit
    # reaches the host)
    assert fsdevs[1] == (
        f"local,id=fs1,path={tmp_path}/rw,security_model=mapped-xattr,fmode=0644,dmode=0755"
    )
    # a rootfs share (no owner; host-made symlinks that mapped-xattr cannot read)
    assert fsdevs[2] == f"local,id=fs2,path={tmp_path}/rootfs,security_model=passthrough"
    assert "virtio-9p-device,fsdev=fs0,mount_tag=vol0" in values(argv, "-device")
    # no shared memory needed for 9p
    assert "-object" not in argv


def test_ninep_unprivileged_maps_writable_and_uses_none_read_only(tmp_path: Path) -> None:
    host = QemuHost(binary="/q", euid=1000)
    shares = [
        ShareSpec("v", tmp_path, "9p", uid=1000, gid=1000),
        ShareSpec("r", tmp_path, "9p", read_only=True, uid=1000, gid=1000),
    ]
    rw, ro = values(argv_of(make_spec(tmp_path, shares=shares), host), "-fsdev")
    assert "security_model=mapped-xattr,fmode=0644,dmode=0755" in rw  # `none` kept setuid
    assert "security_model=none" in ro and "readonly=on" in ro


def test_virtiofs_needs_memfd_and_vhost_user(tmp_path: Path) -> None:
    shares = [ShareSpec("vol0", tmp_path / "d", "virtiofs", socket=tmp_path / "vfs.sock")]
    for machine, dev in (("microvm", "device"), ("q35", "pci")):
        argv = argv_of(make_spec(tmp_path, machine=machine, shares=shares))
        assert values(argv, "-object") == ["memory-backend-memfd,id=mem,size=256M,share=on"]
        assert values(argv, "-machine")[0].endswith(",memory-backend=mem")
        assert f"socket,id=vfs0,path={tmp_path}/vfs.sock" in values(argv, "-chardev")
        assert f"vhost-user-fs-{dev},chardev=vfs0,tag=vol0" in values(argv, "-device")


def test_virtiofs_without_socket_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="virtiofs"):
        argv_of(make_spec(tmp_path, shares=[ShareSpec("v", tmp_path, "virtiofs")]))


def test_unknown_share_kind_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nfs"):
        argv_of(make_spec(tmp_path, shares=[ShareSpec("v", tmp_path, "nfs")]))


def test_agent_virtio_serial_port(tmp_path: Path) -> None:
    argv = argv_of(make_spec(tmp_path))
    assert f"socket,id=agent,path={tmp_path}/agent.port,server=on,wait=off" in values(
        argv, "-chardev"
    )
    assert "virtserialport,chardev=agent,name=org.boxlite.agent" in values(argv, "-device")


def test_stream_agent_is_refused(tmp_path: Path) -> None:
    spec = attrs.evolve(
        make_spec(tmp_path), agent=AgentChannel(ChannelKind.VSOCK, tmp_path / "agent.sock")
    )
    with pytest.raises(ConfigError, match="virtio-serial"):
        argv_of(spec)


def test_long_socket_path_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    with pytest.raises(ConfigError, match="107 bytes"):
        argv_of(make_spec(deep))


def test_plan_is_deterministic_and_json(tmp_path: Path) -> None:
    shares = [ShareSpec("vol0", tmp_path / "d", "virtiofs", socket=tmp_path / "vfs.sock"),
              ShareSpec("vol1", tmp_path / "e", "9p", read_only=True)]
    backend = QemuBackend(HOST)
    one = backend.plan(make_spec(tmp_path, shares=shares))
    two = QemuBackend(HOST).plan(make_spec(tmp_path, shares=shares))
    assert one.to_json() == two.to_json()
    data = json.loads(one.to_json())["data"]
    assert data["accel"] == "tcg" and data["machine"] == "microvm"
    assert data["qmp_socket"] == f"{tmp_path}/qmp.sock"
    assert data["pidfile"] == f"{tmp_path}/qemu.pid"
    assert one.backend == "qemu"


def test_plan_on_this_host_uses_probed_binary(tmp_path: Path) -> None:
    backend = QemuBackend()
    if backend.facts.binary is None:
        pytest.skip("qemu-system not installed")
    plan = backend.plan(make_spec(tmp_path))
    assert plan.data["argv"][0] == backend.facts.binary
    assert plan.data["accel"] == backend.facts.accel.accel
    assert backend.plan(make_spec(tmp_path)).to_json() == plan.to_json()


def test_backend_options_tcg_tb_size_and_unknown_keys(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, backend_options={"tcg_tb_size_mib": 64})
    assert values(argv_of(spec), "-accel") == ["tcg,tb-size=64"]
    with pytest.raises(ConfigError, match="'krun_exec'"):
        argv_of(make_spec(tmp_path, backend_options={"krun_exec": ["/bin/sh"]}))
    with pytest.raises(ConfigError, match="tcg_tb_size_mib"):
        argv_of(make_spec(tmp_path, backend_options={"tcg_tb_size_mib": "big"}))


def test_agent_port_name_comes_from_the_channel(tmp_path: Path) -> None:
    spec = attrs.evolve(
        make_spec(tmp_path),
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, tmp_path / "agent.port", port_name="x.y"),
    )
    assert "virtserialport,chardev=agent,name=x.y" in values(argv_of(spec), "-device")
