from __future__ import annotations

import sqlite3

import attrs
import pytest

from boxlite_core.errors import ConfigError, NotFoundError, StateError
from boxlite_core.models import BoxOptions, BoxStatus
from boxlite_core.runtime.records import BoxRecord
from boxlite_core.runtime.store import BoxStore
from boxlite_core.state.db import SCHEMA_VERSION, Database


def _record(box_id: str, name: str) -> BoxRecord:
    return BoxRecord(
        id=box_id,
        name=name,
        status=BoxStatus.CONFIGURED,
        options=BoxOptions(name=name),
        image="busybox",
    )


@pytest.fixture
def store(tmp_path):
    return BoxStore(Database(tmp_path / "boxlite.db"))


def test_fresh_database_has_current_schema(tmp_path):
    db = Database(tmp_path / "fresh.db")
    assert db.version() == SCHEMA_VERSION
    tables = {r[0] for r in db.connection().execute("SELECT name FROM sqlite_master")}
    assert {"boxes", "images", "image_refs", "counters"} <= tables


def test_version_zero_file_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # an empty file: user_version 0
    assert Database(path).version() == SCHEMA_VERSION


def test_newer_database_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer than this boxlite"):
        Database(path)


def test_unique_names(store):
    store.insert(_record("aaaaaaaaaaaa", "web"))
    with pytest.raises(ConfigError, match=r"a box named web exists.*boxlite rm web"):
        store.insert(_record("bbbbbbbbbbbb", "web"))


def test_lookup_by_id_name_and_prefix(store):
    store.insert(_record("abc123000000", "one"))
    store.insert(_record("abc456000000", "two"))
    assert store.get("one").id == "abc123000000"
    assert store.get("abc456000000").name == "two"
    assert store.get("abc1").name == "one"
    with pytest.raises(NotFoundError, match="several boxes"):
        store.get("abc")
    with pytest.raises(NotFoundError, match="no box 'zzz'"):
        store.get("zzz")


def test_round_trip_keeps_options_and_state(store):
    rec = _record("0123456789ab", "keep")
    rec = attrs.evolve(
        rec, options=BoxOptions(name="keep", env={"A": "1"}, volumes=["/tmp:/data:ro"])
    )
    store.insert(rec)
    store.update(rec.id, state={"x": 1})
    store.update(rec.id, state={"y": 2})
    got = store.get("keep")
    assert got.options.env == {"A": "1"}
    assert got.options.volumes[0].read_only is True
    assert got.state == {"x": 1, "y": 2}


def test_legal_transitions(store):
    store.insert(_record("0123456789ab", "life"))
    for status in (
        BoxStatus.STARTING,
        BoxStatus.RUNNING,
        BoxStatus.STOPPING,
        BoxStatus.STOPPED,
        BoxStatus.STARTING,
        BoxStatus.RUNNING,
        BoxStatus.FAILED,
        BoxStatus.STARTING,
        BoxStatus.FAILED,
        BoxStatus.STARTING,
        BoxStatus.RUNNING,
    ):
        rec = store.get("life")
        store.set_status(rec.id, status)
        assert store.get("life").status is status


def test_illegal_transition_raises_state_error(store):
    rec = store.insert(_record("0123456789ab", "bad"))
    with pytest.raises(StateError, match="cannot go from configured to stopping"):
        store.set_status(rec.id, BoxStatus.STOPPING)
    with pytest.raises(StateError, match="cannot go from configured to running"):
        store.set_status(rec.id, BoxStatus.RUNNING)  # every start passes through starting
    store.set_status(rec.id, BoxStatus.STARTING)
    with pytest.raises(StateError, match="cannot go from starting to stopped"):
        store.set_status(rec.id, BoxStatus.STOPPED)
    store.set_status(rec.id, BoxStatus.RUNNING)
    with pytest.raises(StateError, match="running to running"):
        store.set_status(rec.id, BoxStatus.RUNNING)
    assert store.get(rec.id).status is BoxStatus.RUNNING


def test_delete(store):
    rec = store.insert(_record("0123456789ab", "gone"))
    store.delete(rec.id)
    with pytest.raises(NotFoundError):
        store.get("gone")
