"""VM tests: real boxes booted by the installed backend (slow under TCG; `-m vm`).

The home is the suite's shared one (``shared_home``, boxlite_testing.plugin: BOXLITE_TEST_HOME,
default /var/tmp/boxlite-test-home) so the guest kit and the built-in images are built once,
not per test run. Box names come from ``boxlite_testing.homes.unique``; a ``boxlite``
subprocess's environment from ``boxlite_testing.cli.boxlite_env``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_testing.homes import unique


@pytest.fixture(scope="module")
def vm_home(shared_home: Path) -> Path:
    return shared_home


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
