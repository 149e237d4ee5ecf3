"""The suite's shared fixtures, as one pytest plugin (the repo-root conftest.py loads it).

Fixtures used by more than one test folder live here, once; a folder's conftest.py keeps only
what that folder uses. Helpers and doubles are plain modules beside this one, imported by
name (``from boxlite_testing.oci import layer_tar``), never through ``sys.path``.

- ``shared_home`` / ``built_kit``: the shared test home and the real guest kit built into it
  (kit, VM and libvirt tests).
- ``home`` / ``db`` / ``store``: a fresh runtime home under tmp_path, its database and its
  image store (image, rootfs and registry tests).
- ``busybox_root``: a container root the native agent chroots into (agent tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from . import homes
from .native_agent import build_busybox_root, missing_requirement

if TYPE_CHECKING:
    from boxlite_core.images.store import ImageStore
    from boxlite_core.kit import GuestKit
    from boxlite_core.state.db import Database


@pytest.fixture(scope="session")
def shared_home() -> Path:
    """BOXLITE_TEST_HOME, else /var/tmp/boxlite-test-home (created), so reruns reuse the kit
    and the built-in images."""
    homes.SHARED_HOME.mkdir(parents=True, exist_ok=True)
    return homes.SHARED_HOME


@pytest.fixture(scope="session")
def built_kit(shared_home: Path) -> GuestKit:
    """The real guest kit of this repository, built once into the shared home."""
    from boxlite_core.kit import ensure_kit

    return ensure_kit(shared_home, source_root=homes.REPO)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty runtime home (``tmp_path/home``)."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def db(home: Path) -> Database:
    """The runtime database of ``home``."""
    from boxlite_core.state.db import Database

    return Database(home / "boxlite.db")


@pytest.fixture
def store(home: Path, db: Database) -> ImageStore:
    """The image store of ``home`` (empty)."""
    from boxlite_core.images.store import ImageStore

    return ImageStore(home, db)


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox container root for native agents; skipped where they cannot run."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    return build_busybox_root(tmp_path_factory.mktemp("bbroot") / "root")
