"""BoxStore: box records in the home's sqlite database, with state transitions enforced.

Why transitions are checked inside a write transaction: two host processes may act on the
same box (a CLI `stop` while a program execs); BEGIN IMMEDIATE serialises them, and the
loser gets a StateError naming the state it found instead of silently overwriting it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping

import attrs

from ..errors import ConfigError, NotFoundError, StateError
from ..models import BoxStatus, JsonValue
from ..state.db import Database
from .records import BoxRecord, Column

_COLUMNS = (
    "id", "name", "status", "backend", "image", "image_digest", "rootfs", "created_at",
    "updated_at", "started_at", "stopped_at", "pid", "error", "failures", "options_json",
    "state_json",
)
_UPDATABLE = {
    "backend", "image", "image_digest", "rootfs", "started_at", "stopped_at", "pid", "error",
    "failures", "state",
}


class NameTakenError(ConfigError):
    """The box name is in the table already (the UNIQUE constraint said so, not a prior look)."""


class BoxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- create / read ---------------------------------------------------------------------

    def insert(self, record: BoxRecord) -> BoxRecord:
        now = time.time()
        record = attrs.evolve(record, created_at=record.created_at or now, updated_at=now)
        row = record.to_row()
        marks = ", ".join("?" for _ in _COLUMNS)
        try:
            with self.db.transaction() as tx:
                tx.execute(
                    f"INSERT INTO boxes ({', '.join(_COLUMNS)}) VALUES ({marks})",
                    [row[c] for c in _COLUMNS],
                )
        except sqlite3.IntegrityError as exc:
            if "name" in str(exc):
                raise NameTakenError(
                    f"a box named {record.name} exists; pick another --name or "
                    f"`boxlite rm {record.name}`"
                ) from exc
            raise ConfigError(f"box id {record.id} exists already; retry") from exc
        return record

    def find(self, ref: str) -> BoxRecord | None:
        """The box whose id or name is ``ref``, or whose id starts with it (if unique)."""
        conn = self.db.connection()
        row = conn.execute("SELECT * FROM boxes WHERE id = ? OR name = ?", (ref, ref)).fetchone()
        if row is not None:
            return BoxRecord.from_row(row)
        if len(ref) < 1 or not all(c in "0123456789abcdef" for c in ref):
            return None
        rows = conn.execute(
            "SELECT * FROM boxes WHERE id LIKE ? LIMIT 2", (ref + "%",)
        ).fetchall()
        if len(rows) > 1:
            raise NotFoundError(
                f"box id prefix {ref!r} matches several boxes; type more of the id or use the name"
            )
        return BoxRecord.from_row(rows[0]) if rows else None

    def get(self, ref: str) -> BoxRecord:
        record = self.find(ref)
        if record is None:
            raise NotFoundError(f"no box {ref!r} (see `boxlite ls -a`)")
        return record

    def list(self, statuses: set[BoxStatus] | None = None) -> list[BoxRecord]:
        rows = self.db.connection().execute("SELECT * FROM boxes ORDER BY created_at").fetchall()
        records = [BoxRecord.from_row(r) for r in rows]
        if statuses is not None:
            records = [r for r in records if r.status in statuses]
        return records

    def count(self, status: BoxStatus) -> int:
        row = self.db.connection().execute(
            "SELECT COUNT(*) FROM boxes WHERE status = ?", (status.value,)
        ).fetchone()
        return int(row[0])

    # -- update ----------------------------------------------------------------------------

    def _read(self, tx: sqlite3.Connection, box_id: str) -> BoxRecord:
        row = tx.execute("SELECT * FROM boxes WHERE id = ?", (box_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"box {box_id} was removed")
        return BoxRecord.from_row(row)

    def _write(self, tx: sqlite3.Connection, record: BoxRecord) -> BoxRecord:
        record = attrs.evolve(record, updated_at=time.time())
        row = record.to_row()
        cols = [c for c in _COLUMNS if c not in ("id", "created_at")]
        tx.execute(
            f"UPDATE boxes SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
            [*(row[c] for c in cols), record.id],
        )
        return record

    def update(self, box_id: str, *, state: Mapping[str, JsonValue] | None = None,
               **fields: Column) -> BoxRecord:
        """Change non-status fields; ``state`` is merged key by key into the stored state."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"BoxStore.update: not updatable: {sorted(unknown)}")
        with self.db.transaction() as tx:
            record = self._read(tx, box_id)
            if state is not None:
                fields["state"] = {**record.state, **state}
            return self._write(tx, attrs.evolve(record, **fields))

    def set_status(self, box_id: str, status: BoxStatus, *, expect: set[BoxStatus] | None = None,
                   state: Mapping[str, JsonValue] | None = None,
                   **fields: Column) -> BoxRecord:
        """Move the box to ``status``; StateError if the transition is not allowed.

        ``expect`` narrows the allowed starting states further (e.g. stop only from Running).
        """
        with self.db.transaction() as tx:
            record = self._read(tx, box_id)
            current = record.status
            if not current.can_become(status) or (expect is not None and current not in expect):
                raise StateError(
                    f"box {record.name}: cannot go from {current.value} to {status.value}"
                )
            if state is not None:
                fields["state"] = {**record.state, **state}
            return self._write(tx, attrs.evolve(record, status=status, **fields))

    def begin_start(self, box_id: str, starter: Mapping[str, JsonValue]) -> BoxRecord:
        """Configured/Stopped/Failed → Starting, naming the process that runs the start.

        Written before anything is spawned, so a process killed at any later point leaves a
        record that says a VM may exist (and who was responsible for it), never a
        Configured one with a live VM behind it. StateError from any other state."""
        return self.set_status(
            box_id,
            BoxStatus.STARTING,
            expect={BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED},
            pid=None,
            state={"starter": dict(starter), "stage": "queued", "vmm": None,
                   "failed_stage": None},
        )

    def record_stage(self, box_id: str, stage: str) -> None:
        """Say which init-pipeline stage is running (``inspect`` answers "where is it")."""
        self.update(box_id, state={"stage": stage})

    def record_vmm(self, box_id: str, identity: Mapping[str, JsonValue]) -> None:
        """Remember the launched VMM's pid + start time before the guest is waited for."""
        self.update(box_id, pid=identity.get("pid"), state={"vmm": dict(identity)})

    def bump_state_counter(self, box_id: str, key: str, by: int = 1) -> None:
        with self.db.transaction() as tx:
            record = self._read(tx, box_id)
            counters = dict(record.state.get("counters") or {})
            counters[key] = int(counters.get(key, 0)) + by
            self._write(tx, attrs.evolve(record, state={**record.state, "counters": counters}))

    def delete(self, box_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM boxes WHERE id = ?", (box_id,))


def dumps(record: BoxRecord) -> str:
    return json.dumps(record.to_dict(), indent=2, sort_keys=True)
