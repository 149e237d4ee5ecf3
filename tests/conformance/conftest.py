"""Helpers to run the conformance suite the way a vendor does, in a separate pytest process.

A subprocess (not pytester in-process) because the suite is a pytest plugin with session
state: each run must start clean, exactly as a vendor's CI would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
DOUBLES = HERE / "conformance_doubles.py"
HOME_ENV = "BOXLITE_TEST_HOME"

VENDOR_CONFTEST = """\
pytest_plugins = ["boxlite_conformance.plugin"]

import pytest
from boxlite_core.plugins import PluginRegistry

import conformance_doubles


@pytest.fixture(scope="session")
def boxlite_registry():
    return PluginRegistry(load_entry_points=False, extra_plugins=[("double", conformance_doubles)])
"""
VENDOR_TEST = "from boxlite_conformance.suite import *  # noqa: F403\n"


class SuiteRun:
    def __init__(self, proc: subprocess.CompletedProcess, report_dir: Path, backend: str):
        self.proc = proc
        self.output = proc.stdout + proc.stderr
        path = report_dir / f"{backend}.json"
        self.report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.markdown = (report_dir / f"{backend}.md").read_text() if path.exists() else ""

    def outcomes(self) -> dict[str, str]:
        return {t["test"]: t["outcome"] for t in self.report["tests"]}

    def names(self, outcome: str) -> set[str]:
        return {name for name, out in self.outcomes().items() if out == outcome}

    def messages(self, outcome: str) -> dict[str, str]:
        return {t["test"]: t["message"] for t in self.report["tests"] if t["outcome"] == outcome}


@pytest.fixture
def run_suite(tmp_path: Path) -> Callable[..., SuiteRun]:
    """run_suite(backend, *pytest_args, test_module=VENDOR_TEST, shared_home=False) → SuiteRun.

    Each run gets an empty runtime home unless ``shared_home``: runs that boot VMs use the
    suite's shared test home, whose guest kit and images are already built."""

    def run(
        backend: str, *args: str, test_module: str = VENDOR_TEST, shared_home: bool = False
    ) -> SuiteRun:
        project = tmp_path / f"vendor-{backend}"
        project.mkdir()
        shutil.copy(DOUBLES, project / DOUBLES.name)
        (project / "conftest.py").write_text(VENDOR_CONFTEST)
        (project / "test_vendor_conformance.py").write_text(test_module)
        (project / "pytest.ini").write_text("[pytest]\n")
        report_dir = tmp_path / f"reports-{backend}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(project),
                "-p",
                "no:cacheprovider",
                "-c",
                str(project / "pytest.ini"),
                "--rootdir",
                str(project),
                "-rfEs",
                "--boxlite-backend",
                backend,
                "--conformance-report",
                str(report_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=os.environ if shared_home else {**os.environ, HOME_ENV: str(tmp_path / "home")},
        )
        return SuiteRun(proc, report_dir, backend)

    return run
