"""Bad options fail at construction, naming the field and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import (
    BoxOptions,
    BoxStatus,
    ExecResult,
    ExitStatus,
    VolumeSpec,
    check_timeout,
    normal_guest_path,
)
from boxlite_core.runtime.capacity import check_capacity, host_capacity
from boxlite_core.vmm.spec import DiskSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_mib": 64}, "memory_mib"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": True}, "cpus"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"": "x"}}, "env"),
        ({"workdir": "relative/dir"}, "workdir"),
        ({"volumes": ["/tmp:relative"]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/x:rx"]}, "volume"),
        ({"volumes": ["/tmp:/x", "/var:/x"]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/"]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/."]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/x", "/var://x/./"]}, "volume.guest_path"),
        ({"name": "-leading-dash"}, "name"),
        ({"disk_size_mib": 1}, "disk_size_mib"),
        ({"image": ""}, "image"),
        ({"network": True}, "network"),
        ({"network": "sometimes"}, "network"),
        ({"ports": "8080:80"}, "ports"),
        ({"ports": ["8080:80", "8080:81"]}, "ports"),
        ({"ports": [8080]}, "ports"),
    ],
)
def test_bad_option_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as excinfo:
        BoxOptions(**kwargs)
    assert str(excinfo.value).startswith(f"{field}=")


def test_cpus_error_says_how_many_the_host_has():
    host = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"this host has {host} CPUs; ask for at most {host}"):
        check_capacity(BoxOptions(cpus=host + 1))
    check_capacity(BoxOptions(cpus=host))  # all of them is fine


def test_memory_above_memtotal_is_refused_with_the_numbers(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2097152 kB\nMemFree:          1000 kB\n")
    host = host_capacity(meminfo)
    assert host.memory_mib == 2048
    with pytest.raises(ConfigError) as excinfo:
        check_capacity(BoxOptions(memory_mib=2049), host)
    message = str(excinfo.value)
    assert message.startswith("memory_mib=2049: ")
    assert "this host has 2048 MiB" in message and "at most 2048 MiB" in message
    check_capacity(BoxOptions(memory_mib=2048), host)


def test_this_hosts_memtotal_is_read():
    lines = Path("/proc/meminfo").read_text().splitlines()
    total_kb = next(int(line.split()[1]) for line in lines if line.startswith("MemTotal:"))
    assert host_capacity().memory_mib == total_kb // 1024
    with pytest.raises(ConfigError, match=f"this host has {total_kb // 1024} MiB"):
        check_capacity(BoxOptions(memory_mib=total_kb // 1024 + 1))


def test_stored_options_load_on_a_host_with_fewer_cpus():
    """A record written on a bigger host must still load (to be listed and removed)."""
    data = BoxOptions().to_dict()
    data["cpus"] = (os.cpu_count() or 1) * 4
    assert BoxOptions.from_dict(data).cpus == data["cpus"]


@pytest.mark.parametrize(
    "guest",
    ["/dev", "/dev/", "/dev/shm", "//dev", "/./dev", "/proc", "/proc/sys", "/sys", "/sys/x",
     "/sys/fs/cgroup"],
)
def test_reserved_guest_paths_are_refused(guest):
    with pytest.raises(ConfigError) as excinfo:
        VolumeSpec.parse(f"/tmp:{guest}")
    message = str(excinfo.value)
    assert message.startswith("volume.guest_path=") and "reserved" in message
    assert "elsewhere" in message


@pytest.mark.parametrize("guest", ["/devices", "/data/dev", "/system", "/procfs", "/mnt/proc"])
def test_paths_that_only_look_reserved_are_fine(guest):
    assert VolumeSpec.parse(f"/tmp:{guest}").guest_path == guest


def test_normal_guest_path():
    assert normal_guest_path("//dev/./shm/") == "/dev/shm"
    assert normal_guest_path("/.") == "/"
    assert normal_guest_path("/data") == "/data"


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), float("-inf"), 0, "5"])
def test_exec_timeouts_must_be_positive_and_finite(bad):
    with pytest.raises(ConfigError) as excinfo:
        check_timeout("timeout", bad)
    assert str(excinfo.value).startswith("timeout=")


def test_stop_timeout_may_be_zero_but_not_negative():
    check_timeout("timeout", 0, allow_zero=True)
    check_timeout("timeout", None)
    check_timeout("timeout", 2.5)
    for bad in (-1, float("nan")):
        with pytest.raises(ConfigError):
            check_timeout("timeout", bad, allow_zero=True)


def test_volume_parse_modes():
    assert VolumeSpec.parse("/a:/b") == VolumeSpec("/a", "/b", False)
    assert VolumeSpec.parse("/a:/b:ro") == VolumeSpec("/a", "/b", True)
    assert VolumeSpec.parse("/a:/b:rw").read_only is False


def test_options_round_trip_through_json():
    opts = BoxOptions(
        image="busybox", cpus=1, memory_mib=256, env={"K": "v"}, volumes=["/tmp:/mnt/t:ro"]
    )
    again = BoxOptions.from_dict(json.loads(json.dumps(opts.to_dict())))
    assert again == opts


def test_network_policy_and_ports_round_trip_through_json():
    """A stored record keeps its policy and published ports: a box reloaded from the state db
    (another process, after a restart) enforces exactly what it was created with."""
    from boxlite_core.network.policy import NetworkPolicy

    opts = BoxOptions(
        network=NetworkPolicy.parse(["svc.test:8080", "*.example.com", "203.0.113.0/28"], None),
        ports=["127.0.0.1:8080:80", "9000:9000/tcp"],
    )
    again = BoxOptions.from_dict(json.loads(json.dumps(opts.to_dict())))
    assert again == opts
    assert again.network.describe() == opts.network.describe()
    assert [p.to_json() for p in again.ports] == [p.to_json() for p in opts.ports]
    full = BoxOptions(network="full")
    assert BoxOptions.from_dict(json.loads(json.dumps(full.to_dict()))).network == full.network


def test_records_from_before_networking_load_with_no_network():
    data = BoxOptions().to_dict()
    data.pop("network")
    data.pop("ports")
    old = BoxOptions.from_dict(data)
    assert old.network == BoxOptions().network and old.ports == ()
    assert BoxOptions(network=None).network == BoxOptions(network="none").network


def test_status_transitions():
    assert BoxStatus.CONFIGURED.can_become(BoxStatus.STARTING)
    assert BoxStatus.FAILED.can_become(BoxStatus.STARTING)  # failed boxes are retryable
    assert BoxStatus.STARTING.can_become(BoxStatus.RUNNING)
    # nothing reaches Running without a recorded start (issue 12: no orphaned VMs)
    assert not BoxStatus.CONFIGURED.can_become(BoxStatus.RUNNING)
    assert not BoxStatus.STOPPED.can_become(BoxStatus.STOPPING)
    assert not BoxStatus.CONFIGURED.can_become(BoxStatus.STOPPED)


def test_disk_serial_length_is_checked():
    with pytest.raises(ConfigError, match="20"):
        DiskSpec(path="/x", serial="s" * 21)


def test_exec_result_returncode_follows_shell_convention():
    assert ExecResult(exit_code=42).returncode == 42
    assert ExecResult(exit_code=None, signal=9).returncode == 137
    assert ExecResult(exit_code=None, timed_out=True).returncode == 124


def test_one_exit_status_from_the_channel_to_the_user():
    from boxlite_core.channel.client import ExitStatus as ChannelExitStatus

    assert ChannelExitStatus is ExitStatus
    assert ExitStatus(0).ok and not ExitStatus(0, timed_out=True).ok
    assert not ExitStatus(None, 9).ok and ExitStatus(None, 9).returncode == 137
    assert ExecResult(exit_code=3, signal=None).status == ExitStatus(3)
