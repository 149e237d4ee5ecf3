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


def index_rows(db: Database) -> tuple[int, int]:
    conn = db.connection()
    return (
        conn.execute("SELECT count(*) FROM images").fetchone()[0],
        conn.execute("SELECT count(*) FROM image_refs").fetchone()[0],
    )
