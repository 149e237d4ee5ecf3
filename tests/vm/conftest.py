"""VM tests: real boxes booted by the installed backend (slow under TCG; `-m vm`).

The home is shared across runs (BOXLITE_TEST_HOME, default /var/tmp/boxlite-test-home) so the
guest kit and the built-in images are built once, not per test run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime

HOME = Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def vm_home():
    HOME.mkdir(parents=True, exist_ok=True)
    return HOME


@pytest.fixture(scope="module")
def runtime(vm_home):
    with Runtime(vm_home) as rt:
        yield rt


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vols")
    rw, ro = root / "rw", root / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "keep.txt").write_text("original\n")
    return rw, ro


@pytest.fixture(scope="module")
def box(runtime, volumes):
    """One booted busybox box shared by the module's tests (9p volumes: rw + ro)."""
    rw, ro = volumes
    b = runtime.create(
        BoxOptions(
            image="busybox",
            name=unique("vmtest"),
            memory_mib=256,
            volumes=[f"{rw}:/mnt/rw", f"{ro}:/mnt/ro:ro"],
            volume_sharer="9p",
        )
    )
    b.start()
    yield b
    runtime.remove(b.id, force=True)


def boxlite_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BOXLITE_HOME"] = str(home)
    env.pop("BOXLITE_DEBUG", None)
    return env
