"""Bad options fail at construction, naming the field and the fix."""

from __future__ import annotations

import json
import os

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions, BoxStatus, DiskSpec, ExecResult, VolumeSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_mib": 64}, "memory_mib"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": (os.cpu_count() or 1) + 1}, "cpus"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"": "x"}}, "env"),
        ({"workdir": "relative/dir"}, "workdir"),
        ({"volumes": ["/tmp:relative"]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/x:rx"]}, "volume"),
        ({"volumes": ["/tmp:/x", "/var:/x"]}, "volume.guest_path"),
        ({"volumes": ["/tmp:/"]}, "volume.guest_path"),
        ({"name": "-leading-dash"}, "name"),
        ({"disk_size_mib": 1}, "disk_size_mib"),
        ({"image": ""}, "image"),
        ({"network": True}, "network"),
    ],
)
def test_bad_option_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as excinfo:
        BoxOptions(**kwargs)
    assert str(excinfo.value).startswith(f"{field}=")


def test_cpus_error_says_how_many_the_host_has():
    host = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"at most {host}"):
        BoxOptions(cpus=host + 1)


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


def test_status_transitions():
    assert BoxStatus.CONFIGURED.can_become(BoxStatus.RUNNING)
    assert BoxStatus.FAILED.can_become(BoxStatus.RUNNING)  # failed boxes are retryable
    assert not BoxStatus.STOPPED.can_become(BoxStatus.STOPPING)
    assert not BoxStatus.CONFIGURED.can_become(BoxStatus.STOPPED)


def test_disk_serial_length_is_checked():
    with pytest.raises(ConfigError, match="20"):
        DiskSpec(path="/x", serial="s" * 21)


def test_exec_result_returncode_follows_shell_convention():
    assert ExecResult(exit_code=42).returncode == 42
    assert ExecResult(exit_code=None, signal=9).returncode == 137
    assert ExecResult(exit_code=None, timed_out=True).returncode == 124
