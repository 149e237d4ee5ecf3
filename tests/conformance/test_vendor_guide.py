"""The vendor guide works as written: in a fresh venv, installing the example backend's
distribution is what makes `boxlite-conformance run --backend example --tier 0` pass, and the
example's own two-file test setup (conftest line + star import) runs the same suite.

Offline: the venv sees boxlite-core, pytest, pip and setuptools through
--system-site-packages, and the installs use --no-index --no-deps --no-build-isolation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO / "conformance"
EXAMPLE = CONFORMANCE / "examples" / "boxlite-example-backend"


def _sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vendor")
    env_dir = root / "venv"
    # --without-pip: ensurepip would put an old setuptools (no bdist_wheel without `wheel`)
    # in front of the system's; the system pip, seen through system-site-packages, installs
    # into the venv all the same.
    made = _sh(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)]
    )
    assert made.returncode == 0, made.stderr
    # build from copies: an in-tree build would leave build/ and egg-info in the repo
    shutil.copytree(
        CONFORMANCE,
        root / "conformance",
        ignore=shutil.ignore_patterns("examples", "*.egg-info", "__pycache__"),
    )
    done = _sh(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            str(root / "conformance"),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BOXLITE_PLUGINS", "PYTHONPATH")}
    env["BOXLITE_TEST_HOME"] = str(tmp_path / "home")
    return env


def test_guide_example_backend(venv: Path, tmp_path: Path) -> None:
    bin_dir = venv / "bin"
    env = _env(tmp_path)
    reports = tmp_path / "reports"
    run = [
        str(bin_dir / "boxlite-conformance"),
        "run",
        "--backend",
        "example",
        "--tier",
        "0",
        "--report",
        str(reports),
    ]

    before = _sh(run, env=env, cwd=tmp_path)
    assert before.returncode != 0, "backend 'example' passed before it was installed"
    assert "no VMM backend named 'example'" in before.stdout + before.stderr

    src = tmp_path / "boxlite-example-backend"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    done = _sh(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            str(src),
        ],
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    after = _sh(run, env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr
    data = json.loads((reports / "example.json").read_text())
    assert data["verdict"] == "pass" and data["plugin"] == "example"
    assert data["summary"].get("passed", 0) >= 15
    assert data["capabilities"] == ["kvm", "raw", "vsock"]

    # the vendor's own two files (tests/conftest.py + tests/test_conformance.py) run it too
    own = _sh(
        [
            str(bin_dir / "python"),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            str(src / "tests"),
            "--rootdir",
            str(src),
            "--conformance-max-tier",
            "0",
        ],
        env=env,
        cwd=src,
    )
    assert own.returncode == 0, own.stdout + own.stderr
    assert " passed" in own.stdout
