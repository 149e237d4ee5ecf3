"""build_configuration() through a recording TEST DOUBLE of the framework layer.

The double stands in for PyObjC's Virtualization module, which cannot run on Linux; what is
checked is that a plan's dict turns into the right framework calls, in the right shape.
"""

from __future__ import annotations

import pytest
from hvf_vz_double import MIB, RecordingVzDouble

from boxlite_core.errors import ConfigError, EngineError
from boxlite_hvf.backend import HvfBackend
from boxlite_hvf.framework import build_configuration


@pytest.fixture
def vz(spec):
    vz = HvfBackend(arch="arm64").plan(spec).data["vz"]
    # the launcher converts qcow2 → raw before the runner builds the VM
    for disk in vz["block_devices"]:
        if disk["convert"]:
            disk_path = spec.box_dir / "hvf"
            disk_path.mkdir(exist_ok=True)
            open(disk["path"], "wb").close()
    return vz


def test_every_device_becomes_one_framework_call(spec, vz):
    double = RecordingVzDouble()
    machine = build_configuration(double, vz, 7)
    calls = dict(
        (name, args) for name, args in double.calls if name != "block_device" and name != "share"
    )
    assert calls["boot_loader"] == (
        str(spec.kernel),
        str(spec.initrd),
        vz["boot_loader"]["cmdline"],
    )
    assert [a for n, a in double.calls if n == "block_device"] == [
        (str(spec.box_dir / "hvf" / "00-rootfs.raw"), False, "rootfs"),
        (str(spec.disks[1].path), True, "guestroot"),
    ]
    assert [a for n, a in double.calls if n == "share"] == [
        ("vol0", str(spec.box_dir / "data"), False),
        ("vol1", str(spec.box_dir / "ro"), True),
    ]
    # the console is the runner's capped pipe (fd 7 here), never the log file itself
    assert calls["serial_console"] == (7,)
    assert double.names().count("vsock_device") == 1
    assert double.names()[-1] == "machine"
    assert machine["cpus"] == 1 and machine["memory_bytes"] == 512 * MIB
    assert len(machine["storage"]) == 2 and len(machine["shares"]) == 2
    assert machine["sockets"] == ["vsock_device#" + str(double.names().index("vsock_device"))]
    assert len(machine["serial"]) == 1 and len(machine["entropy"]) == 1
    assert machine["platform"].startswith("platform#")


def test_limits_of_the_framework_are_enforced(vz):
    small = RecordingVzDouble(
        {"min_cpus": 1, "max_cpus": 1, "min_memory": 128 * MIB, "max_memory": 256 * MIB}
    )
    with pytest.raises(ConfigError, match=r"memory_mib=512.*128\.\.256 MiB"):
        build_configuration(small, vz, 7)
    with pytest.raises(ConfigError, match=r"cpus=9.*1\.\.8"):
        build_configuration(RecordingVzDouble(), {**vz, "cpus": 9}, 7)
    assert small.calls == []  # nothing is built before the limits pass


def test_unconverted_qcow2_is_caught_before_the_framework(spec):
    vz = HvfBackend(arch="arm64").plan(spec).data["vz"]
    double = RecordingVzDouble()
    with pytest.raises(EngineError, match="qemu-img convert -O raw"):
        build_configuration(double, vz, 7)
    assert "machine" not in double.names()
