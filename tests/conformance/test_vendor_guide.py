"""The vendor guide works as written: its code blocks parse; in a fresh venv, installing an
example backend's distribution is what makes `boxlite-conformance run --backend NAME --tier 0`
pass (the Firecracker-style `example` and the booting `example-qemu`), and each example's own
two-file test setup (conftest line + star import) runs the same suite. That the booting
example passes T1-T3 here is CI's `boxlite-conformance run --backend example-qemu --strict`
(.ci/run), not a test of this file: a T1 run here was the same boots again.

Offline: the venv sees boxlite-core, pytest, pip and setuptools through
--system-site-packages, and the installs use --no-index --no-deps --no-build-isolation.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO / "conformance"
EXAMPLE = CONFORMANCE / "examples" / "boxlite-example-backend"
EXAMPLE_QEMU = CONFORMANCE / "examples" / "boxlite-example-qemu"
GUIDE = CONFORMANCE / "README.md"
_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)


def guide_blocks(lang: str) -> list[str]:
    """The guide's fenced ``lang`` blocks, dedented (list items indent theirs)."""
    out = []
    for indent, kind, body in _FENCE.findall(GUIDE.read_text()):
        if kind == lang:
            out.append("".join(line[len(indent):] for line in body.splitlines(keepends=True)))
    return out


def test_guide_code_blocks_parse() -> None:
    python, toml, sh = guide_blocks("python"), guide_blocks("toml"), guide_blocks("sh")
    assert len(python) >= 6 and toml and len(sh) >= 3, "the guide lost its examples"
    for block in python:
        ast.parse(block)  # a SyntaxError names the block's line
    for block in toml:
        tomllib.loads(block)
    for block in sh:
        done = _sh(["bash", "-n"], input=block)
        assert done.returncode == 0, f"{done.stderr}\n---\n{block}"


def test_guide_names_exist() -> None:
    """Every ``boxlite_core.vendor`` name the guide's Python imports is really there."""
    import boxlite_core.vendor as vendor

    for block in guide_blocks("python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "boxlite_core.vendor":
                missing = [a.name for a in node.names if not hasattr(vendor, a.name)]
                assert not missing, f"the guide imports {missing} from boxlite_core.vendor"


def guide_field_tables() -> dict[str, set[str]]:
    """``{heading: first-column names}`` of the guide's "The types, field by field" tables;
    a heading is a class name, or a constructor written ``Class(args)``."""
    text = GUIDE.read_text()
    section = text.split("### The types, field by field", 1)[1].split("\n### ", 1)[0]
    tables: dict[str, set[str]] = {}
    for chunk in section.split("\n#### `")[1:]:
        heading, body = chunk.split("`", 1)
        tables[heading.split("(")[0]] = set(re.findall(r"^\| `(\w+)` \|", body, re.M))
    return tables


def test_guide_lists_every_field() -> None:
    """Each type a backend reads has a field table in the guide, naming exactly its fields
    (attrs fields; for ProcessVmHandle, its constructor's parameters), so it cannot drift."""
    import inspect

    import attrs

    import boxlite_core.vendor as vendor

    tables = guide_field_tables()
    types = ("VmSpec", "DiskSpec", "ShareSpec", "AgentChannel", "GuestHints", "LaunchPlan",
             "DiskSwitch")
    expected = {name: {f.name for f in attrs.fields(getattr(vendor, name))} for name in types}
    params = inspect.signature(vendor.ProcessVmHandle.__init__).parameters
    expected["ProcessVmHandle"] = set(params) - {"self"}
    for name, fields in expected.items():
        assert name in tables, f"the guide has no field table for {name}"
        assert tables[name] == fields, (
            f"guide table for {name}: missing {sorted(fields - tables[name])}, "
            f"not fields {sorted(tables[name] - fields)}"
        )


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


def _install_copy(venv: Path, example: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    src = tmp_path / example.name
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    done = _sh(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-build-isolation", str(src)],
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return src


def _own_tests_tier0(venv: Path, src: Path, env: dict[str, str]) -> None:
    """The example's own two files (tests/conftest.py + tests/test_conformance.py)."""
    own = _sh(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
         str(src / "tests"), "--rootdir", str(src), "--conformance-max-tier", "0"],
        env=env,
        cwd=src,
    )
    assert own.returncode == 0, own.stdout + own.stderr
    assert " passed" in own.stdout


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

    src = _install_copy(venv, EXAMPLE, tmp_path, env)

    after = _sh(run, env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr
    data = json.loads((reports / "example.json").read_text())
    assert data["verdict"] == "pass" and data["plugin"] == "example"
    assert data["summary"].get("passed", 0) >= 15
    assert data["capabilities"] == ["kvm", "raw", "vsock"]

    # the vendor's own two files (tests/conftest.py + tests/test_conformance.py) run it too
    _own_tests_tier0(venv, src, env)


def test_guide_example_qemu_backend_tier0(venv: Path, tmp_path: Path) -> None:
    """The booting example, installed from a copy into the venv (it shadows the editable
    install scripts/setup makes), passes T0 and declares what this host gives."""
    env = _env(tmp_path)
    src = _install_copy(venv, EXAMPLE_QEMU, tmp_path, env)
    reports = tmp_path / "reports"
    done = _sh(
        [str(venv / "bin" / "boxlite-conformance"), "run", "--backend", "example-qemu",
         "--tier", "0", "--report", str(reports)],
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((reports / "example-qemu.json").read_text())
    assert data["verdict"] == "pass" and data["plugin"] == "example-qemu"
    assert data["summary"].get("passed", 0) >= 20
    caps = set(data["capabilities"])
    assert {"9p", "virtiofs", "qcow2", "raw", "virtio-serial", "pause", "tcg"} <= caps
    assert "vsock" not in caps and "hvf" not in caps
    _own_tests_tier0(venv, src, env)
