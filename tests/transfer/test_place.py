"""Placing a copy-out result: docker `cp` naming, and no symlink at or under the destination
is ever followed (the destination may be a volume the guest writes). No VM."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.transfer import parse_guest_path, receive_tree
from boxlite_testing.tarcraft import Craft


def tree() -> bytes:
    return (Craft().dir("tree", 0o775).file("tree/a", b"A").dir("tree/sub")
            .file("tree/sub/b", b"B").bytes())


def contents() -> bytes:
    return Craft().dir(".", 0o775).file("./a", b"A").dir("./sub").file("./sub/b", b"B").bytes()


def one_file(name: str = "f", data: bytes = b"new") -> bytes:
    return Craft().file(name, data, 0o640).bytes()


@pytest.fixture(params=["same-fs", "cross-fs"])
def staging(request, tmp_path):
    """Staging on the destination's filesystem (rename) or on another one (copy, EXDEV)."""
    if request.param == "same-fs":
        path = tmp_path / "staging"
    else:
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no second filesystem (/dev/shm) to stage on")
        path = shm / f"boxlite-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o700)
    yield path
    os.rmdir(path)


@pytest.fixture
def outside(tmp_path):
    """A host directory the guest must never reach through a planted link."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim").write_text("original\n")
    return out


def _run(data: bytes, guest: str, dest, staging):
    return receive_tree([data], parse_guest_path(guest), dest, staging=staging).path


def _outside_intact(outside) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "original\n"


# -- docker cp naming ---------------------------------------------------------------------

def test_dir_into_existing_dir(tmp_path, staging):
    dest = tmp_path / "dest"
    dest.mkdir()
    assert _run(tree(), "/data/tree", dest, staging) == dest / "tree"
    assert (dest / "tree/sub/b").read_bytes() == b"B"
    assert stat.S_IMODE(os.stat(dest / "tree").st_mode) == 0o775


def test_dir_to_missing_dest_becomes_it(tmp_path, staging):
    dest = tmp_path / "copy"
    assert _run(tree(), "/data/tree", dest, staging) == dest
    assert (dest / "a").read_bytes() == b"A" and not (dest / "tree").exists()


def test_dir_contents_merge_into_existing_dir(tmp_path, staging):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    assert _run(contents(), "/data/tree/.", dest, staging) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["a", "keep", "sub"]


def test_dir_contents_to_missing_dest(tmp_path, staging):
    dest = tmp_path / "copy"
    _run(contents(), "/data/tree/.", dest, staging)
    assert (dest / "sub/b").read_bytes() == b"B"


def test_file_into_dir_onto_file_and_to_new_name(tmp_path, staging):
    dest = tmp_path / "dest"
    dest.mkdir()
    assert _run(one_file(), "/etc/f", dest, staging) == dest / "f"
    (dest / "g").write_text("old")
    assert _run(one_file("g"), "/etc/g", dest / "g", staging) == dest / "g"
    assert (dest / "g").read_bytes() == b"new"
    assert _run(one_file(), "/etc/f", dest / "renamed", staging) == dest / "renamed"
    assert stat.S_IMODE(os.stat(dest / "renamed").st_mode) == 0o640


def test_dir_onto_file_is_an_error(tmp_path, staging):
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(ConfigError, match="onto the file"):
        _run(tree(), "/data/tree", target, staging)
    assert target.read_text() == "keep"


def test_file_to_missing_dir_with_slash_is_an_error(tmp_path, staging):
    with pytest.raises(ConfigError, match="does not exist"):
        _run(one_file(), "/etc/f", f"{tmp_path}/nodir/", staging)
    with pytest.raises(ConfigError, match="does not exist"):
        _run(one_file(), "/etc/f", tmp_path / "no/parent/f", staging)


def test_single_symlink_copies_as_link(tmp_path, staging):
    dest = tmp_path / "dest"
    dest.mkdir()
    data = Craft().symlink("link", "/etc/passwd").bytes()
    assert _run(data, "/data/link", dest, staging) == dest / "link"
    assert os.readlink(dest / "link") == "/etc/passwd"


# -- hostile destination: links the guest planted in a volume it can write ----------------

def test_planted_link_where_the_dir_lands_is_replaced(tmp_path, staging, outside):
    dest = tmp_path / "vol"
    dest.mkdir()
    (dest / "tree").symlink_to(outside)  # guest: ln -s /somewhere /vol/tree
    _run(tree(), "/vol/tree", dest, staging)
    assert not (dest / "tree").is_symlink() and (dest / "tree/sub/b").read_bytes() == b"B"
    _outside_intact(outside)


def test_planted_link_where_the_file_lands_is_replaced(tmp_path, staging, outside):
    dest = tmp_path / "vol"
    dest.mkdir()
    (dest / "f").symlink_to(outside / "victim")
    _run(one_file(), "/vol/f", dest, staging)
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"new"
    _outside_intact(outside)


def test_planted_links_inside_a_merged_dir_are_replaced(tmp_path, staging, outside):
    dest = tmp_path / "vol"
    (dest / "tree").mkdir(parents=True)
    (dest / "tree/sub").symlink_to(outside)
    (dest / "tree/a").symlink_to(outside / "victim")
    _run(tree(), "/vol/tree", dest, staging)
    assert (dest / "tree/a").read_bytes() == b"A" and not (dest / "tree/a").is_symlink()
    assert (dest / "tree/sub/b").read_bytes() == b"B" and not (dest / "tree/sub").is_symlink()
    _outside_intact(outside)


def test_dest_itself_a_symlink_is_not_followed(tmp_path, staging, outside):
    dest = tmp_path / "out"
    dest.symlink_to(outside)
    _run(one_file(), "/etc/f", dest, staging)
    assert not dest.is_symlink() and dest.read_bytes() == b"new"
    _outside_intact(outside)
    dest.unlink()
    dest.symlink_to(outside)
    _run(contents(), "/data/tree/.", dest, staging)
    assert not dest.is_symlink() and (dest / "a").read_bytes() == b"A"
    _outside_intact(outside)


def test_dest_symlink_with_trailing_slash_refused(tmp_path, staging, outside):
    dest = tmp_path / "out"
    dest.symlink_to(outside)
    with pytest.raises(ConfigError, match="symlink"):
        _run(one_file(), "/etc/f", f"{dest}/", staging)
    _outside_intact(outside)


def test_nothing_is_staged_inside_the_destination(tmp_path, staging):
    """The destination may be guest-writable: no temp dir of ours appears there mid-copy."""
    dest = tmp_path / "vol"
    dest.mkdir()
    seen: list[list[str]] = []

    def chunks():
        data = tree()
        for i in range(0, len(data), 512):
            seen.append(sorted(p.name for p in dest.iterdir()))
            yield data[i : i + 512]

    receive_tree(chunks(), parse_guest_path("/data/tree"), dest, staging=staging)
    assert seen and all(names == [] for names in seen)
    assert sorted(p.name for p in dest.iterdir()) == ["tree"]


def test_read_only_dirs_keep_their_mode_when_moved_merged_or_copied(tmp_path, staging):
    data = (Craft().dir("tree", 0o555).dir("tree/ro", 0o500).file("tree/ro/f", b"F", 0o400)
            .bytes())
    fresh = tmp_path / "fresh"
    _run(data, "/data/tree", fresh, staging)
    existing = tmp_path / "existing"
    (existing / "tree/ro").mkdir(parents=True)
    _run(data, "/data/tree", existing, staging)
    for top in (fresh, existing / "tree"):
        assert stat.S_IMODE(os.lstat(top).st_mode) == 0o555
        assert stat.S_IMODE(os.lstat(top / "ro").st_mode) == 0o500
        assert (top / "ro/f").read_bytes() == b"F"
