from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def db(home: Path) -> Database:
    return Database(home / "boxlite.db")


@pytest.fixture
def store(home: Path, db: Database) -> ImageStore:
    return ImageStore(home, db)
