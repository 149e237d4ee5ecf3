"""OCI whiteouts and opaque directories, in merged mode and in overlay (per-layer) mode."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from boxlite_core.images.layers import OVERLAY_OPAQUE_XATTR, apply_layer_stream
from boxlite_testing.oci import d, f, layer_tar


def apply(entries, target: Path, **kw):
    return apply_layer_stream(io.BufferedReader(io.BytesIO(layer_tar(entries))), target, **kw)


LOWER = [d("a"), f("a/x", "x"), f("a/y", "y"), f("b", "b"), d("c"), f("c/deep", "d"), d("o"),
         f("o/old1", "1"), d("o/sub"), f("o/sub/old2", "2")]  # fmt: skip


def test_whiteout_removes_lower_file_and_dir(tmp_path: Path):
    apply(LOWER, tmp_path)
    stats = apply([f("a/.wh.x"), f(".wh.b"), f(".wh.c")], tmp_path)
    assert not (tmp_path / "a" / "x").exists()
    assert (tmp_path / "a" / "y").read_text() == "y"
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.rglob(".wh.*")), "whiteout markers must not be materialised"
    assert stats.whiteouts == 3


def test_opaque_dir_clears_lower_keeps_same_layer(tmp_path: Path):
    apply(LOWER, tmp_path)
    apply([d("o"), f("o/.wh..wh..opq"), f("o/new", "n")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["new"]


def test_opaque_marker_after_new_entries(tmp_path: Path):
    apply(LOWER, tmp_path)
    apply([d("o"), f("o/new", "n"), f("o/.wh..wh..opq")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["new"]


def test_whiteout_does_not_follow_symlink(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    root = tmp_path / "root"
    apply([d("lnk")], root)
    os.rmdir(root / "lnk")
    os.symlink(outside, root / "lnk")
    apply([f("lnk/.wh.keep")], root)  # resolved in-root: root/<outside>/keep, absent
    assert (outside / "keep").read_text() == "k"


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay whiteouts need root")
def test_overlay_mode_makes_char_dev_and_opaque_xattr(tmp_path: Path):
    lower = tmp_path / "lower"
    apply(LOWER, lower, mode="overlay")
    upper = tmp_path / "upper"
    stats = apply(
        [d("a"), f("a/.wh.x"), d("o"), f("o/.wh..wh..opq"), f("o/new", "n"), f("a/.wh.none")],
        upper,
        mode="overlay",
        lowers=[lower],
    )
    st = os.lstat(upper / "a" / "x")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert OVERLAY_OPAQUE_XATTR == "user.overlay.opaque"  # what the guest's userxattr reads
    assert os.getxattr(upper / "o", OVERLAY_OPAQUE_XATTR) == b"y"
    assert (upper / "o" / "new").read_text() == "n"
    assert not os.path.lexists(upper / "a" / "none"), "a whiteout of nothing below is left out"
    assert stats.whiteouts == 1 and stats.opaque_dirs == 1


@pytest.mark.parametrize("name", ["trusted.overlay.opaque", "user.overlay.opaque"])
def test_layer_cannot_set_overlay_xattrs(tmp_path: Path, name: str):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.pax_headers = {f"SCHILY.xattr.{name}": "y"}
        tar.addfile(info)
    apply_layer_stream(io.BufferedReader(io.BytesIO(buf.getvalue())), tmp_path)
    with pytest.raises(OSError):
        os.getxattr(tmp_path / "dir", name)
