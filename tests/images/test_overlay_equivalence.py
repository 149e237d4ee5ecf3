"""The ``layers`` strategy's per-layer directories, stacked by a real overlayfs mounted as the
guest agent mounts it (``userxattr``), must show what applying the layers one on top of the
other shows (``disk``/``merged``): every entry's type, mode, owner, content, link count,
symlink target and user xattrs. One case per kind of layer input (boxlite issue 17 item 1:
whiteouts, opaque directories, hardlinks across layers) and its neighbours; each case also
checks the merged result against the OCI rules, so both sides being wrong the same way fails.

Needs root (whiteouts are char devices, mounting overlayfs); the guest side of the same
mount is checked on real VMs by tests/vm/test_layers_rootfs_vm.py and conformance T2
``TestStrategyEquivalence``.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from boxlite_conformance import layered_image
from boxlite_core.images.layers import apply_layer_stream
from boxlite_core.images.overlay_view import OVERLAY_XATTR_PREFIX, is_whiteout
from boxlite_testing.oci import d, f, hard, layer_tar, sym
from boxlite_testing.treeview import overlay_mounted, overlay_unavailable, tree_view, tree_xattrs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and mounts need root")


@attrs.frozen
class Case:
    name: str
    layers: list[bytes]
    #: what to look at in the merged tree, and what the OCI rules make it
    observe: Callable[[Path], object]
    want: object
    #: paths whose link count may differ (overlayfs reports the lower inode's)
    nlink_free: tuple[str, ...] = ()


def ls(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def text(path: Path) -> str:
    return path.read_text()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def nlink(path: Path) -> int:
    return path.lstat().st_nlink


def xattr(path: Path, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


CASES = [
    Case(
        "issue-opaque-dir",
        [
            layer_tar(
                [
                    d("etc"),
                    d("etc/app"),
                    f("etc/app/old.conf", "old"),
                    d("etc/app/sub"),
                    f("etc/app/sub/x", "x"),
                ]
            ),
            layer_tar([d("etc/app"), f("etc/app/.wh..wh..opq"), f("etc/app/new.conf", "new")]),
        ],
        lambda r: ls(r / "etc/app"),
        ["new.conf"],
    ),
    Case(
        "opaque-top-level-dir-without-its-entry",
        [
            layer_tar([d("opt"), f("opt/a", "a"), d("opt/s"), f("opt/s/t", "t")]),
            layer_tar([f("opt/.wh..wh..opq"), f("opt/b", "b")]),
        ],
        lambda r: ls(r / "opt"),
        ["b"],
    ),
    Case(
        "opaque-layer-root",
        [
            layer_tar([f("a", "a"), d("dd"), f("dd/x", "x")]),
            layer_tar([f(".wh..wh..opq"), f("b", "b")]),
            layer_tar([f("c", "c")]),
        ],
        ls,
        ["b", "c"],
    ),
    Case(
        "nested-opaque-across-layers",
        [
            layer_tar(
                [d("n"), d("n/a"), f("n/a/x", "x"), d("n/a/b"), f("n/a/b/y", "y"), f("n/c", "c")]
            ),
            layer_tar([d("n"), f("n/.wh..wh..opq"), d("n/a"), f("n/a/q", "q")]),
            layer_tar([d("n/a"), f("n/a/.wh..wh..opq"), f("n/a/r", "r"), f("n/a/b/w", "w")]),
        ],
        lambda r: (ls(r / "n"), ls(r / "n/a"), ls(r / "n/a/b")),
        (["a"], ["b", "r"], ["w"]),
    ),
    Case(
        "opaque-marker-after-entries-in-a-subdir",
        [
            layer_tar([d("o"), d("o/sub"), f("o/sub/old", "1"), f("o/old", "2")]),
            layer_tar([d("o"), d("o/sub"), f("o/sub/new", "3"), f("o/.wh..wh..opq")]),
        ],
        lambda r: (ls(r / "o"), ls(r / "o/sub")),
        (["sub"], ["new"]),
    ),
    Case(
        "whiteout-of-a-dir-and-a-file",
        [
            layer_tar(
                [d("w"), d("w/d"), d("w/d/e"), f("w/d/e/f", "f"), f("w/g", "g"), f("w/h", "h")]
            ),
            layer_tar([f("w/.wh.d"), f("w/.wh.g")]),
        ],
        lambda r: ls(r / "w"),
        ["h"],
    ),
    Case(
        "whiteout-then-recreate-in-the-same-layer",
        [
            layer_tar([d("d"), f("d/old", "old"), d("i"), f("i/old", "old"), f("file", "old")]),
            layer_tar(
                [
                    f(".wh.d"),
                    d("d", mode=0o700),
                    f("d/new", "new"),
                    f(".wh.i"),
                    f("i/new", "new"),  # re-created by its file alone
                    f(".wh.file"),
                    f("file", "new"),
                ]
            ),
        ],
        lambda r: (ls(r / "d"), ls(r / "i"), text(r / "file"), mode(r / "d")),
        (["new"], ["new"], "new", 0o700),
    ),
    Case(
        "whiteout-of-nothing",
        [
            layer_tar([d("p"), f("p/x", "x")]),
            layer_tar([f(".wh.never"), f("p/.wh.nope"), f("q/.wh.nothing")]),
        ],
        lambda r: (ls(r), ls(r / "p")),
        (["p"], ["x"]),
    ),
    Case(
        "whiteout-in-a-dir-only-a-lower-layer-has",
        [
            layer_tar(
                [d("p", mode=0o711, uid=7, gid=8), d("p/q"), f("p/q/r", "r"), f("p/q/s", "s")]
            ),
            layer_tar([f("p/q/.wh.r")]),
        ],
        lambda r: (ls(r / "p/q"), (r / "p").stat().st_uid, mode(r / "p")),
        (["s"], 7, 0o711),
    ),
    Case(
        "hardlink-to-a-lower-file",
        [layer_tar([d("h"), f("h/a", "A", mode=0o751)]), layer_tar([hard("h/b", "h/a")])],
        lambda r: ((r / "h/a").stat().st_ino == (r / "h/b").stat().st_ino, nlink(r / "h/a")),
        (True, 2),
    ),
    Case(
        "hardlink-to-a-file-a-later-layer-whites-out",
        [
            layer_tar([d("h"), f("h/a", "A")]),
            layer_tar([hard("h/b", "h/a")]),
            layer_tar([f("h/.wh.a")]),
        ],
        lambda r: (ls(r / "h"), text(r / "h/b")),
        (["b"], "A"),
        nlink_free=("h/b",),
    ),
    Case(
        "hardlink-chain-across-three-layers",
        [
            layer_tar([d("h"), f("h/c0", "chain")]),
            layer_tar([hard("h/c1", "h/c0")]),
            layer_tar([hard("h/c2", "h/c1")]),
        ],
        lambda r: [nlink(r / f"h/c{i}") for i in range(3)],
        [3, 3, 3],
    ),
    Case(
        "hardlink-to-a-lower-file-that-has-links-already",
        [layer_tar([d("h"), f("h/a", "A"), hard("h/a2", "h/a")]), layer_tar([hard("h/b", "h/a")])],
        lambda r: [nlink(r / "h/a"), nlink(r / "h/b")],
        [3, 3],
    ),
    Case(
        "hardlink-target-in-a-dir-the-same-layer-makes-opaque",
        [
            layer_tar([d("o"), f("o/t", "t")]),
            layer_tar([hard("l", "o/t"), d("o"), f("o/.wh..wh..opq"), f("o/n", "n")]),
        ],
        lambda r: (ls(r / "o"), text(r / "l")),
        (["n"], "t"),
    ),
    Case(
        "hardlink-to-a-lower-symlink",
        [layer_tar([sym("s", "target")]), layer_tar([hard("h", "s")])],
        lambda r: os.readlink(r / "h"),
        "target",
    ),
    Case(
        "write-through-a-lower-dir-symlink",
        [
            layer_tar([d("usr"), d("usr/lib"), sym("lib", "usr/lib"), sym("lib64", "/usr/lib")]),
            layer_tar([f("lib/new", "n"), f("lib64/abs", "a")]),
        ],
        lambda r: (ls(r / "usr/lib"), os.readlink(r / "lib")),
        (["abs", "new"], "usr/lib"),
    ),
    Case(
        "parent-only-a-lower-layer-lists-keeps-its-owner-mode-xattr",
        [
            layer_tar([d("srv", mode=0o750, uid=1000, gid=1000, xattrs={"user.k": "v"})]),
            layer_tar([f("srv/f", "f")]),
        ],
        lambda r: (mode(r / "srv"), (r / "srv").stat().st_uid, xattr(r / "srv", "user.k")),
        (0o750, 1000, b"v"),
    ),
    Case(
        "hardlink-copy-up-keeps-xattr-owner-mode",
        [
            layer_tar([f("x", "x", mode=0o4750, uid=5, gid=6, xattrs={"user.c": "blue"})]),
            layer_tar([hard("y", "x")]),
        ],
        lambda r: (xattr(r / "y", "user.c"), mode(r / "y"), nlink(r / "x")),
        (b"blue", 0o4750, 2),
    ),
    Case(
        "layer-cannot-forge-overlay-xattrs",
        [
            layer_tar([d("v"), f("v/lower", "l")]),
            layer_tar([d("v", xattrs={"user.overlay.opaque": "y", "user.ok": "1"})]),
        ],
        lambda r: (ls(r / "v"), os.listxattr(r / "v")),
        (["lower"], ["user.ok"]),
    ),
    Case(
        "conformance-layered-image",
        layered_image.layers(None),
        lambda r: None,  # compared with layered_image.EXPECTED by its own test below
        None,
        nlink_free=("t/hl/wo2",),
    ),
]


def _merged(case: Case, root: Path) -> Path:
    for raw in case.layers:
        apply_layer_stream(io.BufferedReader(io.BytesIO(raw)), root)
    return root


def _overlay_dirs(case: Case, base: Path) -> list[Path]:
    dirs: list[Path] = []
    for i, raw in enumerate(case.layers):
        target = base / f"layer{i}"
        apply_layer_stream(io.BufferedReader(io.BytesIO(raw)), target, mode="overlay",
                           lowers=list(reversed(dirs)))  # fmt: skip
        dirs.append(target)
    return dirs


@pytest.fixture(scope="module")
def overlay_ok(tmp_path_factory: pytest.TempPathFactory) -> None:
    reason = overlay_unavailable(tmp_path_factory.mktemp("probe"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_dirs_under_overlayfs_show_the_merged_tree(case: Case, tmp_path: Path, overlay_ok):
    merged = _merged(case, tmp_path / "merged")
    assert case.observe(merged) == case.want
    dirs = _overlay_dirs(case, tmp_path / "layers")
    with overlay_mounted(dirs, tmp_path / "ovl") as mnt:
        want, got = tree_view(merged), tree_view(mnt)
        want_x, got_x = tree_xattrs(merged), tree_xattrs(mnt)
    for path in case.nlink_free:
        want[path] = _drop_nlink(want[path])
        got[path] = _drop_nlink(got.get(path, "missing"))
    assert got == want
    assert got_x == want_x


def _drop_nlink(line: str) -> str:
    fields = line.split("|")
    if fields[0] == "file":
        fields[4] = "*"
    return "|".join(fields)


def test_conformance_image_expectation_is_what_the_layers_make(tmp_path: Path):
    """layered_image.EXPECTED (hand-derived) against the layers applied on the host."""
    case = next(c for c in CASES if c.name == "conformance-layered-image")
    root = _merged(case, tmp_path / "merged")
    view = tree_view(root, ["t", "top"])
    assert sorted(view) == sorted(layered_image.EXPECTED)
    wrong = {p: (view[p], w) for p, w in layered_image.EXPECTED.items() if w and view[p] != w}
    assert not wrong
    assert tree_xattrs(root, ["t", "top"]) == layered_image.EXPECTED_XATTRS


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_dirs_hold_only_overlayfs_metadata(case: Case, tmp_path: Path):
    """What the guest's overlayfs reads: whiteouts as char devices 0/0, opaque marks as
    ``user.overlay.opaque`` (never ``trusted.*``), and no ``.wh.*`` names left over."""
    for layer in _overlay_dirs(case, tmp_path):
        for dirpath, dirs, files in os.walk(layer):
            for name in dirs + files:
                path = os.path.join(dirpath, name)
                assert not name.startswith(".wh."), path
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode):
                    assert is_whiteout(st), path
                if not stat.S_ISLNK(st.st_mode):
                    names = os.listxattr(path, follow_symlinks=False)
                    assert not [n for n in names if n.startswith("trusted.")], path
                    assert set(n for n in names if n.startswith(OVERLAY_XATTR_PREFIX)) <= {
                        "user.overlay.opaque"
                    }, path
