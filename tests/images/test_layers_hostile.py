"""Hostile layer tarballs: nothing may be written outside the target directory."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.layers import apply_layer, apply_layer_stream
from boxlite_testing.oci import chrdev, d, f, hard, layer_tar, sym

is_root = os.geteuid() == 0


def snapshot(directory: Path) -> dict[str, str]:
    """Every path below directory with its type and content hash (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(p)] = "f:" + hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[str(p)] = "l:" + os.readlink(p)
            else:
                out[str(p)] = f"m:{st.st_mode:o}"
    return out


@pytest.fixture
def arena(tmp_path: Path):
    """target/ to unpack into, and outside/ next to it holding a sentinel file."""
    target = tmp_path / "target"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    before = snapshot(outside)
    yield target, outside
    assert snapshot(outside) == before, "something was written outside the target"


def apply(entries, target: Path, **kw):
    return apply_layer_stream(io.BufferedReader(io.BytesIO(layer_tar(entries))), target, **kw)


def test_dotdot_member_is_refused(arena):
    target, outside = arena
    with pytest.raises(ImageError, match=r"'\.\.'.*escape"):
        apply([f("../outside/evil", "x")], target)
    assert not (outside / "evil").exists()


def test_dotdot_inside_name_is_refused(arena):
    target, _ = arena
    with pytest.raises(ImageError, match="escape"):
        apply([d("a"), f("a/../../outside/secret", "pwned")], target)


def test_absolute_member_lands_inside_target(arena):
    target, outside = arena
    apply([f(str(outside / "evil"), "x")], target)
    assert (target / str(outside).lstrip("/") / "evil").read_text() == "x"
    assert not (outside / "evil").exists()


def test_relative_symlink_parent_pointing_outside_is_resolved_in_root(arena):
    target, _ = arena
    apply([sym("link", "../outside"), f("link/evil", "x")], target)
    assert (target / "link").is_symlink()
    assert (target / "outside" / "evil").read_text() == "x"


def test_absolute_symlink_parent_is_resolved_in_root(arena):
    target, outside = arena
    apply([sym("abs", str(outside)), f("abs/secret", "pwned")], target)
    assert (target / str(outside).lstrip("/") / "secret").read_text() == "pwned"


def test_deep_symlink_chain_dotdot_is_clamped(arena):
    target, _ = arena
    apply([d("a"), sym("a/up", "../../../../.."), f("a/up/evil", "x")], target)
    assert (target / "evil").read_text() == "x"


def test_file_over_symlink_replaces_the_link(arena):
    target, outside = arena
    apply([sym("victim", str(outside / "secret")), f("victim", "overwritten")], target)
    assert not (target / "victim").is_symlink()
    assert (target / "victim").read_text() == "overwritten"


def test_symlink_then_file_through_it_in_second_layer(arena):
    target, outside = arena
    apply([sym("etc", str(outside))], target)
    apply([f("etc/secret", "layer2")], target)
    assert (target / str(outside).lstrip("/") / "secret").read_text() == "layer2"


def test_hardlink_to_host_file_is_refused(arena):
    target, _ = arena
    nlink = os.stat("/etc/passwd").st_nlink
    with pytest.raises(ImageError, match=r"hardlink.*not in the rootfs"):
        apply([hard("passwd", "/etc/passwd")], target)
    assert os.stat("/etc/passwd").st_nlink == nlink
    assert not (target / "passwd").exists()


def test_hardlink_dotdot_is_refused(arena):
    target, _ = arena
    with pytest.raises(ImageError, match="escape"):
        apply([hard("s", "../outside/secret")], target)


def test_hardlink_through_symlinked_dir_stays_inside(arena):
    target, outside = arena
    # 'out' points at the real outside dir; the hardlink's target must resolve in-root
    with pytest.raises(ImageError, match="not in the rootfs"):
        apply([sym("out", str(outside)), hard("h", "out/secret")], target)


def test_hardlink_inside_layer_works(arena):
    target, _ = arena
    apply([f("a", "same"), hard("b", "a")], target)
    assert os.stat(target / "a").st_ino == os.stat(target / "b").st_ino


def test_symlink_loop_is_an_error(arena):
    target, _ = arena
    with pytest.raises(ImageError, match="too many levels"):
        apply([sym("x", "y"), sym("y", "x"), f("x/file", "z")], target)


def test_device_node_skipped_when_devices_not_allowed(arena):
    target, _ = arena
    stats = apply([chrdev("null")], target, allow_devices=False)
    assert stats.skipped_devices == 1
    assert not (target / "null").exists()


@pytest.mark.skipif(not is_root, reason="creating device nodes needs root")
def test_device_node_created_inside_as_root(arena):
    target, _ = arena
    stats = apply([d("dev"), chrdev("dev/null", 1, 3)], target)
    st = os.lstat(target / "dev" / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stats.devices == 1


@pytest.mark.skipif(not is_root, reason="needs root to drop to an unprivileged user")
def test_device_node_skipped_when_not_root():
    """Run the real applier as uid 65534 in a child: devices are skipped, files still land."""
    base = Path(tempfile.mkdtemp(prefix="bxtest-"))  # pytest's tmp dirs are 0700: unreachable
    os.chmod(base, 0o755)
    target = base / "t"
    target.mkdir()
    os.chown(target, 65534, 65534)
    data = layer_tar([chrdev("null"), f("ok", "fine", mode=0o4755)])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            stats = apply_layer_stream(io.BufferedReader(io.BytesIO(data)), target)
            os.write(w, f"{stats.skipped_devices},{stats.files}".encode())
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    try:
        assert result == "1,1"
        assert not (target / "null").exists()
        assert (target / "ok").stat().st_uid == 65534
    finally:
        shutil.rmtree(base)


def test_size_limit_names_layer_and_cap(arena, tmp_path: Path):
    target, _ = arena
    blob = tmp_path / "big.tar"
    blob.write_bytes(layer_tar([f("a", b"x" * 5000), f("b", b"y" * 5000)]))
    with pytest.raises(ImageError, match=r"big\.tar.*8000 bytes"):
        apply_layer(blob, "application/vnd.oci.image.layer.v1.tar", target, size_limit=8000)


@pytest.mark.skipif(not is_root, reason="owners are only kept as root")
def test_owner_and_setuid_kept_as_root(arena):
    target, _ = arena
    apply([f("su", "bin", mode=0o4755, uid=1000, gid=1000), d("t", mode=0o1777)], target)
    st = os.stat(target / "su")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert st.st_mode & 0o7777 == 0o4755
    assert os.stat(target / "t").st_mode & 0o7777 == 0o1777


def test_not_a_tar_is_an_image_error(tmp_path: Path):
    blob = tmp_path / "junk"
    blob.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(ImageError, match="not a valid tar"):
        apply_layer(blob, "application/vnd.oci.image.layer.v1.tar", tmp_path / "t")
