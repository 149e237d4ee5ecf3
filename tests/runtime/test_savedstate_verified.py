"""A saved state's digests are not hashed again while its files are unchanged, and a change
is still caught: in place with the same size, with the mtime set back, or by a new file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from boxlite_core.runtime import savedstate
from boxlite_core.runtime.savedstate import VERIFIED, StaleStateError, load, seal, verify_digests


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "vmstate").write_bytes(os.urandom(256 * 1024))
    (directory / "meta.json").write_text("{}\n")
    seal(directory, {"key": "k"})
    return directory


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The names of the files verify_digests really hashed."""
    seen: list[str] = []
    real = savedstate._sha256

    def counting(path: Path) -> str:
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(savedstate, "_sha256", counting)
    return seen


def _verified_once(directory: Path) -> None:
    time.sleep(savedstate.TRUST_AFTER_S + 0.1)  # the files' ctimes are old enough to trust
    verify_digests(load(directory))
    assert (directory / VERIFIED).exists()
    assert (directory / VERIFIED).stat().st_mode & 0o777 == 0o400


def test_an_unchanged_state_is_hashed_once(state_dir: Path, hashes: list[str]) -> None:
    """The seal's own hashes count as the first check: a fork restores its fresh snapshot
    without hashing it again (that second hash competed with the copy's QEMU)."""
    assert (state_dir / VERIFIED).exists()
    assert (state_dir / VERIFIED).stat().st_mode & 0o777 == 0o400
    verify_digests(load(state_dir))  # right after the seal
    verify_digests(load(state_dir))
    assert hashes == []


def test_a_write_during_the_seals_hash_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """A file that changes while seal hashes it is sealed as it was read, and not recorded as
    checked: the next verify hashes it again and sees the change."""
    directory = tmp_path / "state"
    directory.mkdir()
    target = directory / "vmstate"
    target.write_bytes(os.urandom(256 * 1024))
    real = savedstate._sha256

    def hash_then_write(path: Path) -> str:
        digest = real(path)
        os.chmod(path, 0o600)  # a writer that still had its way in
        with open(path, "r+b") as fh:
            fh.write(b"\xff" * 64)
        return digest

    monkeypatch.setattr(savedstate, "_sha256", hash_then_write)
    seal(directory, {"key": "k"})
    monkeypatch.setattr(savedstate, "_sha256", real)
    with pytest.raises(StaleStateError, match="vmstate changed since it was saved"):
        verify_digests(load(directory))


@pytest.mark.parametrize("how", ["same size, other bytes", "mtime set back", "replaced"])
def test_a_change_after_the_check_is_still_caught(state_dir: Path, how: str) -> None:
    _verified_once(state_dir)
    target = state_dir / "vmstate"
    before = target.stat()
    if how == "replaced":  # a new file of the same size under the old name
        fresh = state_dir / "vmstate.new"
        fresh.write_bytes(os.urandom(before.st_size))
        os.replace(fresh, target)
    else:
        target.chmod(0o600)
        with open(target, "r+b") as fh:
            fh.seek(1000)
            fh.write(b"\xff" * 64)
        if how == "mtime set back":
            os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(StaleStateError, match="vmstate changed since it was saved"):
        verify_digests(load(state_dir))


def test_a_forged_record_does_not_skip_the_hash(state_dir: Path, hashes: list[str]) -> None:
    """The record only says which identity was checked: one that does not match the file's
    stat (here: another file's) makes it hash again."""
    _verified_once(state_dir)
    record = state_dir / VERIFIED
    text = record.read_text().replace('"vmstate"', '"other"')
    record.chmod(0o600)
    record.write_text(text)
    hashes.clear()
    verify_digests(load(state_dir))
    assert "vmstate" in hashes
