"""The copy-out extractor against crafted (hostile) tar streams, no VM.

Each stream is what a guest that replaced its agent can send. The rule checked every time:
nothing is written outside the destination, and a refused archive leaves nothing at all.
"""

from __future__ import annotations

import os
import stat
import tarfile

import pytest

from boxlite_core.diskspace import DiskSpaceError
from boxlite_core.errors import GuestError
from boxlite_core.transfer import SpecialBitsStripped, parse_guest_path, receive_tree
from boxlite_core.transfer.untar import MAX_EXTENDED_HEADER
from boxlite_testing.tarcraft import Craft, cve_2025_4517


@pytest.fixture
def area(tmp_path):
    """outer/ (must stay untouched: holds victim), outer/dest (the destination), staging."""
    outer = tmp_path / "outer"
    dest = outer / "dest"
    dest.mkdir(parents=True)
    (outer / "victim").write_text("original\n")
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    return outer, dest, staging


def _copy(data: bytes, guest: str, dest, staging, *, pieces: int = 7):
    """Feed ``data`` in uneven chunks, as gRPC would."""
    step = max(1, len(data) // pieces)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    return receive_tree(chunks, parse_guest_path(guest), dest, staging=staging)


def _untouched(outer, dest, staging) -> None:
    assert (outer / "victim").read_text() == "original\n"
    assert sorted(p.name for p in outer.iterdir()) == ["dest", "victim"]
    assert list(dest.iterdir()) == [], "a refused archive must leave nothing at the destination"
    assert list(staging.iterdir()) == [], "the staging directory must be removed"


def test_cve_2025_4517_symlink_chain_cannot_write_outside(area):
    outer, dest, staging = area
    # sized for the extraction dir the old code used (DEST/.boxlite-cp-XXXXXXXX/out)
    data = cve_2025_4517("top", len(str(dest)) + len("/.boxlite-cp-XXXXXXXX/out"), 3, "victim")
    with pytest.raises(GuestError, match="below a symlink"):
        _copy(data, "/top", dest, staging)
    _untouched(outer, dest, staging)


@pytest.mark.parametrize(
    ("name", "craft", "why"),
    [
        ("absolute", Craft().dir("top").file("/tmp/evil", b"x"), "absolute"),
        ("dotdot", Craft().dir("top").file("top/../../victim", b"x"), r"'\.\.'"),
        ("hardlink-outside", Craft().dir("top").hardlink("top/h", "../victim"), r"'\.\.'"),
        ("hardlink-absolute", Craft().dir("top").hardlink("top/h", "/etc/passwd"), "absolute"),
        ("hardlink-to-link", Craft().dir("top").symlink("top/l", "/etc").hardlink("top/h", "top/l"),
         "not a regular file"),
        ("symlink-then-file", Craft().dir("top").symlink("top/d", "../..").file("top/d/victim"),
         "below a symlink"),
        ("abs-symlink-then-file", Craft().dir("top").symlink("top/d", "/tmp")
         .file("top/d/boxlite-evil"), "below a symlink"),
        ("chardev", Craft().dir("top").node("top/null", tarfile.CHRTYPE), "device"),
        ("blockdev", Craft().dir("top").node("top/sda", tarfile.BLKTYPE), "device"),
        ("other-top", Craft().dir(".ssh").file(".ssh/authorized_keys", b"ssh-ed25519 AAAA"),
         "requested entry 'top'"),
        ("second-top", Craft().dir("top").dir(".ssh").file(".ssh/authorized_keys", b"k"),
         "requested entry 'top'"),
        ("child-before-parent", Craft().dir("top").file("top/a/b", b"x"), "before its parent"),
        ("duplicate-file", Craft().dir("top").file("top/f", b"1").file("top/f", b"2"), "twice"),
        ("file-then-dir", Craft().dir("top").file("top/f", b"1").dir("top/f"), "twice"),
        ("empty", Craft(), "empty"),
        ("not-tar", None, "not a valid tar"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_hostile_archive_refused(area, name, craft, why):
    outer, dest, staging = area
    data = b"this is not a tar stream " * 100 if craft is None else craft.bytes()
    with pytest.raises(GuestError, match=why):
        _copy(data, "/top", dest, staging)
    _untouched(outer, dest, staging)


def test_request_name_wins_over_archive_name(area):
    """A request for /x must not produce DEST/.ssh/authorized_keys (finding b)."""
    outer, dest, staging = area
    data = Craft().file(".ssh/authorized_keys", b"ssh-ed25519 AAAA attacker").bytes()
    with pytest.raises(GuestError, match="requested entry 'x'"):
        _copy(data, "/x", dest, staging)
    _untouched(outer, dest, staging)


def test_huge_declared_size_refused_before_writing(area):
    outer, dest, staging = area
    data = Craft().dir("top").declared("top/big", 1 << 50, b"z" * 4096).bytes()
    with pytest.raises(DiskSpaceError, match="free space"):
        _copy(data, "/top", dest, staging)
    _untouched(outer, dest, staging)


def test_truncated_stream_refused(area):
    outer, dest, staging = area
    data = Craft().dir("top").declared("top/big", 10 << 20, b"z" * 4096).bytes()
    with pytest.raises(GuestError, match=r"not a valid tar|truncated"):
        _copy(data[: 64 * 1024], "/top", dest, staging)
    _untouched(outer, dest, staging)


def test_huge_extended_header_refused_without_reading_it(area):
    outer, dest, staging = area
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 4 * MAX_EXTENDED_HEADER
    head = info.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(GuestError, match="extended header"):
        _copy(head + b"\0" * 1024, "/top", dest, staging)
    _untouched(outer, dest, staging)


def test_setuid_file_stripped_and_reported(area):
    _outer, dest, staging = area
    data = (Craft().dir("top", 0o2775).file("top/suid", b"#!", 0o4755)
            .file("top/sgid", b"#!", 0o2755).file("top/plain", b"p", 0o664).bytes())
    with pytest.warns(SpecialBitsStripped, match="top/suid, top/sgid"):
        result = _copy(data, "/top", dest, staging)
    out = dest / "top"
    assert result.path == out and result.stripped == ("top/suid", "top/sgid")
    assert stat.S_IMODE(os.lstat(out / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "sgid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "plain").st_mode) == 0o664
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o2775, "a setgid directory keeps setgid"


def test_fifo_kept_as_fifo(area):
    _outer, dest, staging = area
    data = Craft().dir("top").node("top/pipe", tarfile.FIFOTYPE, 0o640).bytes()
    _copy(data, "/top", dest, staging)
    st = os.lstat(dest / "top/pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640


def test_cp_a_semantics_links_modes(area):
    """Absolute and dangling symlinks are inert links; 0775 stays 0775; hard links stay links."""
    outer, dest, staging = area
    data = (Craft().dir("top", 0o775).dir("top/shared", 0o2775).dir("top/ro", 0o555)
            .file("top/shared/gw", b"group-writable", 0o664)
            .file("top/ro/inside", b"in a 0555 dir", 0o444)
            .symlink("top/abs", "/etc/passwd").symlink("top/rel", "shared/gw")
            .symlink("top/dangling", "/no/such/thing").symlink("top/up", "../../victim")
            .hardlink("top/hard", "top/shared/gw").bytes())
    _copy(data, "/top", dest, staging)
    out = dest / "top"
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(out / "shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(out / "ro").st_mode) == 0o555
    assert (out / "ro/inside").read_bytes() == b"in a 0555 dir"
    assert stat.S_IMODE(os.lstat(out / "shared/gw").st_mode) == 0o664
    assert os.readlink(out / "abs") == "/etc/passwd"
    assert os.readlink(out / "dangling") == "/no/such/thing"
    assert os.readlink(out / "up") == "../../victim"
    assert os.lstat(out / "hard").st_ino == os.lstat(out / "shared/gw").st_ino
    assert os.lstat(out / "shared/gw").st_mtime == 1_600_000_000
    assert (outer / "victim").read_text() == "original\n"


def test_directory_listed_twice_keeps_last_mode(area):
    _outer, dest, staging = area
    data = Craft().dir("top", 0o700).file("top/f", b"1").dir("top", 0o755).bytes()
    _copy(data, "/top", dest, staging)
    assert stat.S_IMODE(os.lstat(dest / "top").st_mode) == 0o755


def test_negative_pax_size_refused(area):
    outer, dest, staging = area
    craft = Craft().dir("top")
    info = tarfile.TarInfo("top/neg")
    info.pax_headers = {"size": "-4096"}
    craft.tar.addfile(info)
    with pytest.raises(GuestError, match="negative size"):
        _copy(craft.bytes(), "/top", dest, staging)
    _untouched(outer, dest, staging)
