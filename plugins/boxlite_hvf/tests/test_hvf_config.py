"""plan()/vz_config(): the pure VmSpec → Virtualization.framework translation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hvf_specs import make_spec

from boxlite_core.errors import ConfigError
from boxlite_core.proto.wire import AGENT_VSOCK_CMDLINE_KEY as AGENT_CMDLINE_KEY
from boxlite_core.proto.wire import AGENT_VSOCK_PORT as DEFAULT_AGENT_VSOCK_PORT
from boxlite_core.vmm.spec import Capability, ChannelKind, DiskSpec, GuestHints, ShareSpec
from boxlite_hvf.backend import HvfBackend
from boxlite_hvf.config import vz_config


def test_plan_is_deterministic_and_json_serialisable(spec):
    backend = HvfBackend(arch="arm64")
    first, second = backend.plan(spec), backend.plan(spec)
    assert first.backend == "hvf"
    assert first.to_json() == second.to_json()
    assert json.loads(first.to_json())["data"]["vz"] == first.data["vz"]
    assert first.spec is spec


def test_backend_contract_facts():
    backend = HvfBackend(arch="arm64")
    assert backend.name == "hvf"
    assert backend.channel_kind is ChannelKind.VSOCK
    assert backend.capabilities() == {
        Capability.VIRTIOFS,
        Capability.RAW,
        Capability.VSOCK,
        Capability.ATTACH,
        Capability.HVF,
    }
    assert Capability.NINEP not in backend.capabilities()
    assert Capability.QCOW2 not in backend.capabilities()


def test_boot_loader_moves_console_to_hvc0_and_names_agent_port(spec):
    vz = vz_config(spec, "arm64")
    boot = vz["boot_loader"]
    assert boot["kernel"] == str(spec.kernel) and boot["initrd"] == str(spec.initrd)
    words = boot["cmdline"].split()
    assert "console=ttyS0" not in words
    assert words.count("console=hvc0") == 1
    assert f"{AGENT_CMDLINE_KEY}={DEFAULT_AGENT_VSOCK_PORT}" in words
    assert words[:4] == ["quiet", "loglevel=3", "panic=-1", "reboot=t"]
    assert "uncompressed" in boot["kernel_format"]
    assert vz["platform"] == "generic"


def test_cpus_and_memory_bytes(tmp_path):
    vz = vz_config(make_spec(tmp_path, cpus=2, memory_mib=768), "x86_64")
    assert vz["cpus"] == 2
    assert vz["memory_bytes"] == 768 * 1024 * 1024
    assert vz["arch"] == "x86_64"


def test_qcow2_disk_is_converted_to_raw_in_the_box_dir(spec):
    rootfs, guestroot = vz_config(spec, "arm64")["block_devices"]
    conv = rootfs["convert"]
    assert conv["from"] == "qcow2" and conv["source"] == str(spec.disks[0].path)
    assert rootfs["path"] == conv["target"]
    assert Path(conv["target"]).parent == spec.box_dir / "hvf"
    assert conv["target"].endswith(".raw")
    assert conv["argv"][:1] == ["qemu-img"] and conv["argv"][5:7] == ["-O", "raw"]
    assert conv["argv"][-2:] == [conv["source"], conv["target"]]
    assert conv["reuse"] == "keep"  # a writable disk's raw copy is the box's disk from now on
    assert rootfs["read_only"] is False and rootfs["identifier"] == "rootfs"
    # a raw disk goes straight through, read-only kept
    assert guestroot == {
        "path": str(spec.disks[1].path),
        "read_only": True,
        "identifier": "guestroot",
        "convert": None,
    }


def test_read_only_qcow2_is_reconverted_when_newer(tmp_path):
    disk = DiskSpec(tmp_path / "base.qcow2", format="qcow2", read_only=True)
    (entry,) = vz_config(make_spec(tmp_path, disks=(disk,)), "arm64")["block_devices"]
    assert entry["convert"]["reuse"] == "if-newer"
    assert entry["path"].endswith("00-disk0.raw")


def test_virtiofs_shares_keep_read_only(spec):
    shares = vz_config(spec, "arm64")["shares"]
    assert shares == [
        {"tag": "vol0", "path": str(spec.box_dir / "data"), "read_only": False},
        {"tag": "vol1", "path": str(spec.box_dir / "ro"), "read_only": True},
    ]


def test_vz_virtiofs_kind_is_accepted_and_socket_ignored(tmp_path):
    share = ShareSpec("v", tmp_path, kind="vz-virtiofs", socket=tmp_path / "vfsd.sock")
    (entry,) = vz_config(make_spec(tmp_path, shares=(share,)), "arm64")["shares"]
    assert entry == {"tag": "v", "path": str(tmp_path), "read_only": False}


def test_9p_share_is_a_config_error_naming_the_capability(tmp_path):
    share = ShareSpec("vol0", tmp_path, kind="9p")
    with pytest.raises(ConfigError, match=r"9p.*capability 9p|capability 9p") as err:
        HvfBackend(arch="arm64").plan(make_spec(tmp_path, shares=(share,)))
    assert "virtiofs" in str(err.value)


def test_bad_share_tags_are_refused(tmp_path):
    long = ShareSpec("x" * 37, tmp_path, kind="virtiofs")
    with pytest.raises(ConfigError, match="tag"):
        vz_config(make_spec(tmp_path, shares=(long,)), "arm64")
    dup = (ShareSpec("a", tmp_path, kind="virtiofs"), ShareSpec("a", tmp_path, kind="virtiofs"))
    with pytest.raises(ConfigError, match="unique"):
        vz_config(make_spec(tmp_path, shares=dup), "arm64")


def test_vsock_agent_port_and_console(spec, tmp_path):
    vz = vz_config(spec, "arm64")
    assert vz["vsock"] == {
        "agent_port": DEFAULT_AGENT_VSOCK_PORT,
        "bridge_socket": str(spec.agent.socket),
    }
    assert vz["serial_console"] == {
        "device": "virtio-console",
        "log": str(spec.console_log),
        "max_bytes": spec.console_log_max_bytes,
        "backups": 2,
    }
    assert vz["network"] is None and vz["entropy"] is True
    custom = vz_config(make_spec(tmp_path, vsock_port=5000), "arm64")
    assert custom["vsock"]["agent_port"] == 5000
    assert f"{AGENT_CMDLINE_KEY}=5000" in custom["boot_loader"]["cmdline"].split()
    with pytest.raises(ConfigError, match="vsock_port"):
        vz_config(make_spec(tmp_path, vsock_port=22), "arm64")


def test_network_and_unknown_arch_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="network"):
        vz_config(make_spec(tmp_path, network=True), "arm64")
    with pytest.raises(ConfigError, match="riscv64"):
        vz_config(make_spec(tmp_path), "riscv64")


def test_arch_aliases_and_hint(tmp_path):
    assert vz_config(make_spec(tmp_path), "aarch64")["arch"] == "arm64"
    plan = HvfBackend(arch="x86_64").plan(make_spec(tmp_path, guest=GuestHints(arch="arm64")))
    assert plan.data["vz"]["arch"] == "arm64"
    assert plan.data["watch_parent"] is False


def test_backend_options_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'tcg_tb_size_mib'"):
        vz_config(make_spec(tmp_path, backend_options={"tcg_tb_size_mib": 64}), "arm64")
    plan = HvfBackend(arch="arm64").plan(
        make_spec(tmp_path, backend_options={"hvf_watch_parent": True})
    )
    assert plan.data["watch_parent"] is True
