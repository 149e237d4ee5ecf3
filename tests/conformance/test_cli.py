"""`boxlite-conformance` end to end, with the broken doubles installed through a real entry
point (a dist-info on PYTHONPATH), as a vendor's distribution would be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def doubles_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    info = site / "boxlite_conformance_doubles-0.1.dist-info"
    info.mkdir(parents=True)
    shutil.copy(HERE / "conformance_doubles.py", site / "conformance_doubles.py")
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: boxlite-conformance-doubles\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text("[boxlite]\ndouble = conformance_doubles\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "BOXLITE_PLUGINS": "double",  # only the doubles (and core): installed backends stay out
        "BOXLITE_TEST_HOME": str(tmp_path / "home"),
    }


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "boxlite_conformance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_run_passes_a_good_backend(doubles_env, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    junit = tmp_path / "junit.xml"
    done = cli(
        "run",
        "--backend",
        "double-good",
        "--tier",
        "0",
        "--report",
        str(reports),
        "--junitxml",
        str(junit),
        env=doubles_env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((reports / "double-good.json").read_text())
    assert data["verdict"] == "pass" and data["plugin"] == "double"
    test = next(t for t in data["tests"] if t["test"].endswith("test_plan_is_deterministic"))
    assert set(test) >= {"tier", "capabilities", "outcome", "duration"}
    assert "| T0 | 9p | yes |" in (reports / "double-good.md").read_text()
    assert "<testsuite" in junit.read_text()


def test_run_exits_nonzero_on_a_t0_failure(doubles_env, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    done = cli(
        "run",
        "--backend",
        "double-ro-ignored",
        "--tier",
        "0",
        "--report",
        str(reports),
        env=doubles_env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    md = (reports / "double-ro-ignored.md").read_text()
    assert "**FAIL**" in md and "test_plan_follows_share_read_only[9p]" in md


def test_run_all_writes_one_combined_table(doubles_env, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    done = cli("run", "--backend", "all", "--tier", "0", "--report", str(reports), env=doubles_env)
    assert done.returncode == 1, done.stdout + done.stderr  # three doubles are broken
    table = (reports / "all.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")
    }
    assert set(rows) == {
        "`double-good`",
        "`double-nondeterministic`",
        "`double-ro-ignored`",
        "`double-bad-probe`",
        "`double-qemu`",
        "`double-qemu-ro-ignored`",  # its fault is in the VM tiers: T0 passes
        "`double-qemu-pause-ignored`",
    }
    assert "| PASS |" in rows["`double-good`"]
    assert "| FAIL |" in rows["`double-nondeterministic`"]
    summary = json.loads((reports / "all.json").read_text())
    assert {s["backend"]: s["verdict"] for s in summary}["double-good"] == "pass"


def test_list_shows_tiers_and_capabilities(doubles_env) -> None:
    done = cli("list", env=doubles_env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("T0 ") and "test_plan_is_deterministic" in line for line in lines)
    assert any(
        line.startswith("T2 ") and "virtiofs" in line and "TestVolumes" in line for line in lines
    )
    listed = json.loads(cli("list", "--json", env=doubles_env).stdout)
    assert {t["tier"] for t in listed} == {0, 1, 2, 3}


def test_list_and_report_show_capability_groups(doubles_env, tmp_path: Path) -> None:
    done = cli("list", env=doubles_env)
    assert done.returncode == 0, done.stderr
    assert "Capabilities by group" in done.stdout
    for line in ("  devices: 9p (", "  operations: pause (", "  acceleration: kvm ("):
        assert line in done.stdout, done.stdout[-1500:]
    assert "host:auto-idmap" in done.stdout and "host:sharer-on-host" in done.stdout
    listed = json.loads(cli("list", "--json", env=doubles_env).stdout)
    owner = next(t for t in listed if "as_the_volume_owner[9p]" in t["test"])
    assert set(owner["host_requirements"]) == {"shares-from-here", "sharer-on-host", "auto-idmap"}

    reports = tmp_path / "reports"
    cli("run", "--backend", "double-good", "--tier", "0", "--report", str(reports),
        env=doubles_env)
    md = (reports / "double-good.md").read_text()
    assert "declared capabilities: devices: 9p, qcow2, virtio-serial; acceleration: tcg" in md
    assert "| T0 | 9p | yes | 2 | 0 | 0 | pass | devices |" in md
