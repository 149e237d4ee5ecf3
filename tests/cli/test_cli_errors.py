"""The CLI's error contract: one `boxlite: error: …` line on stderr, the right exit code."""

from __future__ import annotations

import json

import pytest

from boxlite_testing.cli import boxlite


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["run", "--cpus", "0", "busybox", "true"], 2, "cpus=0"),
        (["run", "--cpus", "100000", "busybox", "true"], 2, "this host has"),
        (["run", "--memory", "64", "busybox", "true"], 2, "at least 128 MiB"),
        (["run", "--name", "-bad", "busybox", "true"], 2, "name="),
        (
            ["run", "-v", "/definitely/not/here:/data", "busybox", "true"],
            2,
            "/definitely/not/here does not exist",
        ),
        (["run", "-v", "a:b:c:d", "busybox", "true"], 2, "HOST:GUEST"),
        (["run", "-v", "/tmp:relative", "busybox", "true"], 2, "must be absolute"),
        (["run", "-e", "=x", "busybox", "true"], 2, "KEY=VALUE"),
        (["run", "-w", "rel", "busybox", "true"], 2, "workdir="),
        (["run", "-d", "-i", "busybox"], 2, "-d and -i"),
        (["run"], 2, "Missing argument 'IMAGE'"),
        (["inspect", "nosuchbox"], 3, "no box 'nosuchbox'"),
        (["rm", "nosuchbox"], 3, "no box 'nosuchbox'"),
        (["exec", "nosuchbox", "--", "true"], 3, "no box 'nosuchbox'"),
        (["exec", "-w", "rel", "x", "--", "true"], 2, "must be absolute"),
        (["cp", "a", "b"], 2, "exactly one of SRC and DST"),
        (["nosuchcommand"], 2, "No such command"),
    ],
)
def test_errors_are_one_line(tmp_path, args, code, needle):
    proc = boxlite(*args, home=tmp_path / "home")
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("boxlite: error: ")
    assert needle in lines[0]
    assert proc.stdout == ""


def test_debug_shows_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "BOXLITE_HOME": str(tmp_path / "home"), "BOXLITE_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", "inspect", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("(see `boxlite ls -a`)")


def test_empty_home_listings(tmp_path):
    home = tmp_path / "home"
    proc = boxlite("ls", "--json", "-a", home=home)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    proc = boxlite("metrics", "--json", home=home)
    data = json.loads(proc.stdout)
    assert data["boxes_running"] == 0 and data["boxes_created"] == 0
    proc = boxlite("ls", home=home)
    assert proc.stdout.split() == ["ID", "NAME", "IMAGE", "BACKEND", "CREATED", "STATUS"]


def test_doctor_reports_each_check(tmp_path):
    proc = boxlite("doctor", home=tmp_path / "home")
    lines = proc.stdout.splitlines()
    names = {line.split()[1].rstrip(":") for line in lines}
    assert {"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "virtiofsd", "kvm", "disk"} <= names
    assert all(line.split()[0] in ("ok", "warn", "fail") for line in lines)
    failed = any(line.startswith("fail") for line in lines)
    assert proc.returncode == (1 if failed else 0)
