"""Issue 12, finding 6: what `run`/`exec`/`stop` refuse before anything boots, and that a
refused box leaves no record; --rm also removes a box whose start failed (no VM here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from boxlite_testing.cli import boxlite


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("boxlite: error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def _records(home: Path) -> list[dict]:
    proc = boxlite("ls", "-a", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "guest", ["/dev", "/dev/shm", "/proc", "/proc/sys/kernel", "/sys/x", "/sys", "/", "//dev/"]
)
def test_volume_on_reserved_guest_path_is_refused(tmp_path, guest):
    host = tmp_path / "vol"
    host.mkdir()
    home = tmp_path / "home"
    proc = boxlite("run", "--rm", "-v", f"{host}:{guest}", "busybox", "true", home=home)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert f"volume.guest_path='{guest}'" in line
    assert ("reserved for the guest kernel" in line) or ("cannot mount a volume over '/'" in line)
    assert _records(home) == []


def test_duplicate_guest_paths_are_refused_even_spelled_differently(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    home = tmp_path / "home"
    proc = boxlite("run", "-v", f"{a}:/data", "-v", f"{b}:/data/./", "busybox", "true", home=home)
    assert proc.returncode == 2
    assert "two volumes use the same guest path" in _one_error_line(proc)
    assert _records(home) == []


def test_memory_above_the_host_is_refused_with_the_numbers(tmp_path):
    total = _mem_total_mib()
    home = tmp_path / "home"
    proc = boxlite("run", "--rm", "--memory", str(total + 1), "busybox", "true", home=home)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert f"memory_mib={total + 1}" in line and f"this host has {total} MiB" in line
    assert _records(home) == []


def test_cpus_above_the_host_is_refused_with_the_numbers(tmp_path):
    host = os.cpu_count() or 1
    home = tmp_path / "home"
    proc = boxlite("run", "--cpus", str(host + 1), "busybox", "true", home=home)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert f"cpus={host + 1}" in line and f"this host has {host} CPUs" in line
    assert _records(home) == []


@pytest.mark.parametrize("value", ["-1", "nan", "0", "inf"])
def test_run_refuses_a_timeout_that_is_not_a_duration(tmp_path, value):
    home = tmp_path / "home"
    proc = boxlite("run", "--rm", "--timeout", value, "busybox", "true", home=home)
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc).startswith("boxlite: error: --timeout=")
    assert _records(home) == []


def test_exec_and_stop_refuse_negative_timeouts(tmp_path):
    home = tmp_path / "home"
    proc = boxlite("exec", "--timeout", "-1", "anybox", "--", "true", home=home)
    assert proc.returncode == 2, proc.stderr
    assert "--timeout=-1.0: must be more than 0 seconds" in _one_error_line(proc)
    proc = boxlite("stop", "-t", "-1", "anybox", home=home)
    assert proc.returncode == 2, proc.stderr
    assert "-t/--timeout=-1.0: must be 0 or more seconds" in _one_error_line(proc)
    proc = boxlite("stop", "-t", "nan", "anybox", home=home)
    assert proc.returncode == 2 and "finite" in _one_error_line(proc)


# A start that fails before the VM boots, with --rm: the box is removed and the one error line
# says why. The guest kit lookup is replaced by one that raises (a double: a real kit build
# cannot be made to fail on purpose); everything else (CLI, runtime, store, rootfs) is real.
_FAILING_KIT_DOUBLE = textwrap.dedent("""
    import sys
    from boxlite_core.cli import context, main as cli_main
    from boxlite_core.errors import EngineError
    from boxlite_core.runtime.runtime import Runtime

    def failing_kit(home, progress):
        raise EngineError("guest kit double: kernel missing (apt-get install linux-image-amd64)")

    context.factory = lambda: Runtime(kit_provider=failing_kit)
    cli_main.main(sys.argv[1:])
""")


@pytest.mark.parametrize("auto_remove", [True, False])
def test_rm_removes_a_box_whose_start_failed_kit_double(tmp_path, auto_remove):
    home = tmp_path / "home"
    env = {**os.environ, "BOXLITE_HOME": str(home)}
    env.pop("BOXLITE_DEBUG", None)
    args = ["run", *(["--rm"] if auto_remove else []), "--name", "doomed", "busybox", "true"]
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_KIT_DOUBLE, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("boxlite: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "start failed in guest_kit_prep" in errors[0]
    assert "kernel missing (apt-get install linux-image-amd64)" in errors[0]
    records = _records(home)
    if auto_remove:
        assert records == [], records
        assert "removed: --rm" in errors[0] and "console:" in errors[0]
        assert not any((home / "boxes").iterdir())
    else:  # without --rm the failed box stays for `boxlite logs` / `inspect`
        assert [(r["name"], r["status"]) for r in records] == [("doomed", "failed")]
        assert "kept for diagnosis" in proc.stderr


def test_api_refuses_bad_timeouts_before_touching_the_box(tmp_path):
    """Box.exec / exec_stream / stop name the bad timeout (ConfigError) instead of ignoring it
    or failing on something else first (the box here was never started)."""
    from boxlite_core.errors import ConfigError
    from boxlite_testing import runtime_doubles as doubles

    layout = doubles.make_oci_layout(tmp_path / "layout", {"bin/x": b"x"}, {"Cmd": ["/bin/x"]})
    with doubles.make_runtime(tmp_path) as rt:
        rt.images.import_path(layout, name=doubles.TINY)
        box = rt.create(doubles.opts(name="idle"))
        for bad in (-1, float("nan")):
            with pytest.raises(ConfigError, match=r"^timeout="):
                box.exec(["true"], timeout=bad)
            with pytest.raises(ConfigError, match=r"^timeout="):
                box.exec_stream(["true"], timeout=bad)
            with pytest.raises(ConfigError, match=r"^timeout="):
                box.stop(timeout=bad)
        box.stop(timeout=0)  # zero is "force at once", allowed for stop
