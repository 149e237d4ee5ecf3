"""The runtime's sqlite database: one file under the home, versioned schema, migrations.

Why sqlite: several host processes (CLI calls, a long-running program) share one home; sqlite
gives them atomic updates and a unique box name without a daemon. Columns hold what is queried
(name, status, pid); JSON holds the rest, so a new option does not need a migration.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from .home import FILE_MODE, create_private_file

#: Ordered migrations: (version, statements). Never edit a released one; append a new one.
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        1,
        (
            """CREATE TABLE boxes (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                status TEXT NOT NULL,
                backend TEXT,
                image TEXT NOT NULL,
                image_digest TEXT,
                rootfs TEXT NOT NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                started_at REAL,
                stopped_at REAL,
                pid INTEGER,
                error TEXT,
                failures INTEGER NOT NULL DEFAULT 0,
                options_json TEXT NOT NULL,
                state_json TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX boxes_status ON boxes(status)",
            """CREATE TABLE images (
                digest TEXT PRIMARY KEY,
                config_digest TEXT NOT NULL,
                manifest_json TEXT NOT NULL,
                config_json TEXT NOT NULL,
                size INTEGER NOT NULL,
                created_at REAL NOT NULL
            )""",
            """CREATE TABLE image_refs (
                reference TEXT PRIMARY KEY,
                digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
            )""",
            """CREATE TABLE counters (
                name TEXT PRIMARY KEY,
                value INTEGER NOT NULL DEFAULT 0
            )""",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE snapshots (
                name TEXT PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                box_id TEXT NOT NULL,
                box_name TEXT NOT NULL,
                backend TEXT NOT NULL,
                created_at REAL NOT NULL,
                complete INTEGER NOT NULL DEFAULT 0,
                record_json TEXT NOT NULL
            )""",
        ),
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


class Database:
    """A thread-safe handle on the home's database (one connection per thread).

    The file is created 0600 before sqlite opens it (sqlite gives ``-wal``/``-shm`` the
    database's mode): it holds ``-e`` values, which are often secrets.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private_file(self.path)
        self._local = threading.local()
        self.migrate()
        self._tighten_sidecars()

    def _tighten_sidecars(self) -> None:
        """-wal/-shm made by an older boxlite (or another tool) may be 0644: make them 0600."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(OSError):
                if side.stat().st_mode & 0o077 and side.stat().st_uid == os.geteuid():
                    os.chmod(side, FILE_MODE)

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: writers from other processes wait instead of failing."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        conn = self.connection()
        with contextlib.suppress(sqlite3.OperationalError):
            conn.execute("PRAGMA journal_mode = WAL")
        with self.transaction() as tx:
            current = int(tx.execute("PRAGMA user_version").fetchone()[0])
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"database {self.path} has schema version {current}, newer than this "
                    f"boxlite understands ({SCHEMA_VERSION}); upgrade boxlite-core"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    tx.execute(statement)
                tx.execute(f"PRAGMA user_version = {version}")

    def bump(self, counter: str, by: int = 1) -> None:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (counter, by),
            )

    def counters(self) -> dict[str, int]:
        rows = self.connection().execute("SELECT name, value FROM counters").fetchall()
        return {row["name"]: row["value"] for row in rows}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
