"""The home is private: the db holds `-e` values (finding 7: another user read an API token).

Real parts: a real Runtime, a real image import and `create`, real sqlite in WAL mode, and a
real second user (`nobody`, through setpriv) trying to read the database.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from boxlite_core.runtime.runtime import Runtime
from boxlite_testing.oci import f, layer_tar, oci_layout_files, write_dir

SECRET = "sk-test-0123456789abcdef"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _runtime_with_secret(home: Path, tmp_path: Path) -> Runtime:
    rt = Runtime(home)
    layout = write_dir(oci_layout_files([layer_tar([f("bin/hello", b"hi\n", mode=0o755)])]),
                       tmp_path / "layout")
    rt.images.import_path(layout, name="tiny:1")
    rt.create(image="tiny:1", env={"TOKEN": SECRET}, backend="qemu")
    return rt


def test_new_home_is_0700_and_db_wal_shm_are_0600_after_create_with_env(tmp_path):
    old = os.umask(0o022)  # the usual umask: what made the db 0644
    try:
        home = tmp_path / "home"
        rt = _runtime_with_secret(home, tmp_path)
        try:
            db = home / "boxlite.db"
            assert SECRET.encode() in b"".join(
                p.read_bytes() for p in home.glob("boxlite.db*")), "the secret is in the db"
            assert _mode(home) == 0o700
            for side in ("", "-wal", "-shm"):
                path = db.with_name(db.name + side)
                assert path.exists(), f"{path.name} should exist in WAL mode"
                assert _mode(path) == 0o600, f"{path.name} is {_mode(path):04o}"
            for sub in ("boxes", "locks", "images"):
                assert _mode(home / sub) & 0o077 == 0, f"{sub} is {_mode(home / sub):04o}"
        finally:
            rt.close()
    finally:
        os.umask(old)


def test_existing_world_readable_home_is_tightened_once_with_a_notice(tmp_path, caplog):
    home = tmp_path / "home"
    rt = _runtime_with_secret(home, tmp_path)
    rt.close()
    # what an older boxlite left behind
    os.chmod(home, 0o755)
    for path in home.glob("boxlite.db*"):
        os.chmod(path, 0o644)
    os.chmod(home / "boxes", 0o755)
    lock = home / "locks" / "abc.lock"
    lock.write_text("")
    os.chmod(lock, 0o644)
    caplog.set_level(logging.WARNING)
    with Runtime(home):
        pass
    with Runtime(home):
        pass
    notices = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(notices) == 1, [r.getMessage() for r in caplog.records]
    assert notices[0].levelno == logging.WARNING
    assert str(home) in notices[0].getMessage()
    assert _mode(home) == 0o700
    assert _mode(home / "boxes") == 0o700
    for path in home.glob("boxlite.db*"):
        assert _mode(path) == 0o600, f"{path.name} is {_mode(path):04o}"
    assert _mode(lock) == 0o600


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv (util-linux) to act as another user")
def test_another_user_cannot_read_the_db(tmp_path):
    # a parent every user can traverse (pytest's tmp dirs are 0700, which would hide the bug)
    parent = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="boxlite-home-test-"))
    os.chmod(parent, 0o755)
    try:
        _another_user_cannot_read(parent, tmp_path)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _another_user_cannot_read(parent: Path, tmp_path: Path) -> None:
    home = parent / "home"
    rt = _runtime_with_secret(home, tmp_path)
    rt.close()
    probe = ("import sys,pathlib\n"
             "try:\n"
             "    home = pathlib.Path(sys.argv[1])\n"
             "    data = b''.join(p.read_bytes() for p in home.glob('boxlite.db*'))\n"
             "except PermissionError:\n"
             "    sys.exit(3)\n"
             "sys.exit(0 if data else 4)\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-c", probe, str(home)],
        capture_output=True, timeout=60)
    # glob on an untraversable dir finds nothing (4) or raises (3): either way, no bytes
    assert proc.returncode in (3, 4), proc.stderr.decode()
    # and the db file itself refuses nobody even if they could reach it
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "cat", str(home / "boxlite.db")], capture_output=True, timeout=60)
    assert proc.returncode != 0 and SECRET.encode() not in proc.stdout
