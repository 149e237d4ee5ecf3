"""Red-team findings against copy-out (boxlite_core.transfer), each reproduced first, no VM.

Each test is an attack a guest (root in its VM, its own agent) or an ordinary docker-style
use could mount, that the first version of the package got wrong: a crash with the staging
directory left behind, unbounded host memory, a refusal a docker user would not get, or a
destination left half-written. The rule checked each time: the copy either lands whole or
fails with a boxlite error, and nothing of it stays in DEST or in the staging directory.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
import uuid
from pathlib import Path

import pytest

from boxlite_core.diskspace import DiskSpaceError
from boxlite_core.errors import BoxliteError, ConfigError, GuestError
from boxlite_core.transfer import parse_guest_path, receive_tree
from boxlite_core.transfer.untar import MAX_DEPTH
from boxlite_testing.tarcraft import Craft, crafted_name

REPO = Path(__file__).resolve().parents[2]


def _copy(data, guest: str, dest, staging):
    chunks = [data] if isinstance(data, bytes) else data
    return receive_tree(chunks, parse_guest_path(guest), dest, staging=staging)


@pytest.fixture
def staging(tmp_path):
    path = tmp_path / "staging"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def other_fs(tmp_path):
    """A directory on another filesystem than ``tmp_path`` (copy path, not rename)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm)")
    path = shm / f"boxlite-redteam-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _deep(depth: int, top: str = "t") -> bytes:
    c = Craft().dir(top)
    path = top
    for _ in range(depth):
        path += "/d"
        c.dir(path)
    return c.file(path + "/f", b"deep").bytes()


# -- deep nesting: RecursionError, staging left behind ------------------------------------

@pytest.mark.parametrize("how", ["cross-fs", "merge"])
def test_very_deep_tree_is_refused_not_a_recursion_crash(tmp_path, staging, other_fs, how):
    """1500 levels: placing (merge / cross-fs copy) recursed past Python's limit and raised
    RecursionError, leaving the whole staged copy in the staging dir."""
    dest = other_fs / "dest"
    dest.mkdir()
    if how == "merge":
        (dest / "t").mkdir()
    with pytest.raises(GuestError, match="path components"):
        _copy(_deep(1500), "/t", dest, staging)
    assert list(staging.iterdir()) == []
    assert [p.name for p in dest.iterdir()] == (["t"] if how == "merge" else [])
    assert not any(p.name.startswith(".boxlite-cp-") for p in dest.rglob("*"))


@pytest.mark.parametrize("how", ["cross-fs", "merge", "same-fs"])
def test_tree_at_the_depth_limit_still_copies(tmp_path, staging, other_fs, how):
    dest = (tmp_path if how == "same-fs" else other_fs) / "dest"
    dest.mkdir()
    if how == "merge":
        (dest / "t").mkdir()
    _copy(_deep(MAX_DEPTH - 1), "/t", dest, staging)
    assert (dest / "t" / "/".join(["d"] * (MAX_DEPTH - 1)) / "f").read_bytes() == b"deep"
    assert list(staging.iterdir()) == []


def test_deep_names_cost_memory_linear_in_the_stream(staging, tmp_path):
    """Bookkeeping keyed by a tuple of components cost ~60 bytes per level per entry: a
    stream of deep names grew host memory ~7x its own size (quadratic in the depth)."""
    top, path = "t", "t"
    c = Craft().dir(top)
    for _ in range(200):
        path += "/dd"
        c.dir(path)
    for i in range(1500):
        c.symlink(f"{path}/l{i}", "x")
    data = c.bytes()
    dest = tmp_path / "dest"
    tracemalloc.start()
    try:
        _copy(data, "/t", dest, staging)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data), f"peak {peak} bytes for a {len(data)}-byte stream"


def test_name_longer_than_path_max_is_refused(tmp_path, staging):
    name = "t/" + "/".join(["n" * 200] * 25)
    c = Craft().dir("t")
    path = "t"
    for part in name.split("/")[1:]:
        path += "/" + part
        c.dir(path)
    with pytest.raises(GuestError, match="longer than a path can be"):
        _copy(c.bytes(), "/t", tmp_path / "dest", staging)
    assert list(staging.iterdir()) == [] and not (tmp_path / "dest").exists()


# -- tarfile parser memory: sparse maps and global headers --------------------------------

def _sparse_old_gnu() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("s")
        info.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(info)
    return buf.getvalue()


def _sparse_pax(headers: dict[str, str], size: int = 0) -> bytes:
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    info = tarfile.TarInfo("s")
    info.size = size
    info.pax_headers = headers
    buf.write(info.tobuf(tar.format, tar.encoding, tar.errors))
    return buf.getvalue()


def _sparse_10_endless_map():
    """GNU sparse 1.0: the map is in the member's data, one number per line, as many as
    the first line says: tarfile reads it all into a list (4-5x the stream in memory)."""
    yield _sparse_pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                       "GNU.sparse.name": "s", "GNU.sparse.realsize": "10"}, 1 << 40)
    yield b"1000000000\n"
    for _ in range(16):
        yield b"1\n" * (1 << 20)


@pytest.mark.parametrize("stream", [
    pytest.param(_sparse_old_gnu, id="gnu-old-S"),
    pytest.param(lambda: [_sparse_pax({"GNU.sparse.size": "1", "GNU.sparse.numblocks": "1",
                                       "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1"},
                                      1)], id="pax-0.0"),
    pytest.param(lambda: [_sparse_pax({"GNU.sparse.size": "1", "GNU.sparse.map": "0,1"}, 1)],
                 id="pax-0.1"),
    pytest.param(_sparse_10_endless_map, id="pax-1.0-endless-map"),
])
def test_sparse_members_are_refused_before_their_map_is_read(tmp_path, staging, stream):
    data = stream()
    tracemalloc.start()
    try:
        with pytest.raises(GuestError, match="sparse"):
            _copy(data, "/s", tmp_path / "dest", staging)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    assert list(staging.iterdir()) == [] and not (tmp_path / "dest").exists()


def _global_header(keys: dict[str, str]) -> bytes:
    info = tarfile.TarInfo("g")
    return info._create_pax_generic_header(keys, tarfile.XGLTYPE, "utf-8")


def test_pax_global_headers_are_bounded_in_sum(tmp_path, staging):
    """Each global header was bounded (1 MiB) but they accumulate in TarFile.pax_headers
    and are copied into every later member: an endless run of them grew without limit."""
    def chunks():
        for i in range(8):
            yield _global_header({f"k{i}": "v" * (900 * 1024)})
        yield Craft().file("x", b"x").bytes()

    with pytest.raises(GuestError, match="global headers"):
        _copy(chunks(), "/x", tmp_path / "dest", staging)
    # one small global header (git archive writes one) is still fine
    _copy([_global_header({"comment": "abc"}) + Craft().file("x", b"x").bytes()], "/x",
          tmp_path / "dest", staging)
    assert (tmp_path / "dest").read_bytes() == b"x"


# -- merging onto conflicting types: half-written DEST, a user's file deleted ---------------

def test_contents_merge_conflict_fails_before_anything_is_moved(tmp_path, staging):
    dest = tmp_path / "dest"
    (dest / "zz").mkdir(parents=True)
    (dest / "zz/keep").write_text("mine")
    c = Craft().dir(".")
    for i in range(10):
        c.file(f"./a{i}", b"A")
    c.file("./zz", b"file where DEST has a directory")
    with pytest.raises(ConfigError, match="is a directory; cannot replace"):
        _copy(c.bytes(), "/data/.", dest, staging)
    assert sorted(p.name for p in dest.iterdir()) == ["zz"], "DEST was half-written"
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize("cross", [False, True])
def test_nested_dir_onto_a_users_file_is_refused_not_deleted(tmp_path, staging, other_fs,
                                                            cross):
    """docker cp refuses (NoOverwriteDirNonDir); the merge used to unlink the file."""
    dest = (other_fs if cross else tmp_path) / "dest"
    (dest / "tree").mkdir(parents=True)
    (dest / "tree/sub").write_text("user data")
    data = Craft().dir("tree").file("tree/a", b"A").dir("tree/sub").file("tree/sub/b").bytes()
    with pytest.raises(ConfigError, match="directory onto the file"):
        _copy(data, "/data/tree", dest, staging)
    assert (dest / "tree/sub").read_text() == "user data"
    assert sorted(p.name for p in (dest / "tree").iterdir()) == ["sub"]


def test_nested_dir_onto_a_planted_link_still_replaces_the_link(tmp_path, staging):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    (dest / "tree").mkdir(parents=True)
    (dest / "tree/sub").symlink_to(outside)
    _copy(Craft().dir("tree").dir("tree/sub").file("tree/sub/b").bytes(), "/t/tree", dest,
          staging)
    assert not (dest / "tree/sub").is_symlink() and list(outside.iterdir()) == []


# -- small or full destination filesystems --------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs with 40 inodes, unmounted afterwards (needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=40", "tmpfs",
                           str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_small_destination_fs_takes_a_small_file(small_fs, staging):
    """The 256 MiB boxlite reserve was required on the *destination* filesystem: a 5-byte
    file onto an 8 MiB filesystem was refused (docker cp and cp copy it)."""
    assert _copy(Craft().file("f", b"hello").bytes(), "/f", small_fs, staging).path == \
        small_fs / "f"
    assert (small_fs / "f").read_bytes() == b"hello"


def test_too_many_files_for_the_destination_inodes(small_fs, staging):
    """Inodes were not checked: the copy died half-way with a raw OSError (ENOSPC)."""
    c = Craft().dir("t")
    for i in range(100):
        c.file(f"t/f{i}", b"x")
    with pytest.raises(DiskSpaceError, match="inodes"):
        _copy(c.bytes(), "/t", small_fs, staging)
    assert list(small_fs.iterdir()) == [] and list(staging.iterdir()) == []


def test_disk_full_mid_copy_is_a_disk_space_error(staging, other_fs, monkeypatch):
    dest = other_fs / "dest"
    dest.mkdir()
    import boxlite_core.transfer.place as place_mod

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(place_mod.os, "copy_file_range", full)
    with pytest.raises(DiskSpaceError, match="ran out of disk space"):
        _copy(Craft().dir("t").file("t/a", b"A" * 5000).bytes(), "/t", dest, staging)
    assert list(dest.iterdir()) == [] and list(staging.iterdir()) == []


# -- an unprivileged user (no CAP_DAC_OVERRIDE): read-only directories ----------------------

_UNPRIVILEGED = r"""
import os, sys, tempfile
from boxlite_testing.tarcraft import Craft
from boxlite_core.errors import ConfigError
from boxlite_core.transfer import parse_guest_path, receive_tree
base, staging = sys.argv[2], sys.argv[3]
data = Craft().dir("t", 0o555).dir("t/ro", 0o500).file("t/ro/f", b"F", 0o400).bytes()
receive_tree([data], parse_guest_path("/t"), base + "/new", staging=staging)
assert oct(os.stat(base + "/new").st_mode & 0o7777) == "0o555"
assert open(base + "/new/ro/f").read() == "F"
assert os.listdir(staging) == [], os.listdir(staging)
os.makedirs(base + "/into/t/ro")  # into an existing dir, and merged into an existing tree
os.makedirs(base + "/empty")
for dest in (base + "/empty", base + "/into"):
    receive_tree([data], parse_guest_path("/t"), dest, staging=staging)
    assert oct(os.stat(dest + "/t/ro").st_mode & 0o7777) == "0o500"
    assert open(dest + "/t/ro/f").read() == "F"
    os.chmod(dest + "/t", 0o755)
    os.chmod(dest + "/t/ro", 0o755)
    os.unlink(dest + "/t/ro/f")
assert os.listdir(staging) == [], os.listdir(staging)
open(base + "/file", "w").write("keep")
try:
    receive_tree([data], parse_guest_path("/t"), base + "/file", staging=staging)
except ConfigError:
    pass
assert os.listdir(staging) == [], "staging left behind: " + repr(os.listdir(staging))
print("ok")
"""


def test_read_only_dirs_for_a_user_without_dac_override(tmp_path, staging):
    """Same-fs rename of a 0555 dir needs write on it ('..'): EACCES for a normal user; and
    after a refused placement the staged 0555 tree could not be removed (rmtree ignored)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    base = tmp_path / "u"
    base.mkdir()
    ran = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c",
         _UNPRIVILEGED, str(REPO), str(base), str(staging)],
        capture_output=True, text=True, timeout=60,
    )
    assert ran.returncode == 0 and "ok" in ran.stdout, ran.stderr[-2000:]


# -- through Box.copy_out and the hostile agent double --------------------------------------

@pytest.mark.parametrize("which", ["deep", "sparse"])
def test_double_agent_deep_or_sparse_stream_leaves_nothing(double_box, streams, tmp_path,
                                                           which):
    path = f"/r{uuid.uuid4().hex[:6]}"
    data = _deep(1500, path[1:]) if which == "deep" else _sparse_pax(
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": path[1:],
         "GNU.sparse.realsize": "10"}, 1024) + b"1000000000\n" + b"1\n" * 600_000
    (streams / crafted_name(path)).write_bytes(data)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BoxliteError) as caught:
        double_box.copy_out(path, dest)
    assert isinstance(caught.value, GuestError)
    assert list(dest.iterdir()) == []
    leftovers = list((Path(double_box._link.services.home) / "tmp").glob("copy-out-*"))
    assert leftovers == []


# -- messages: guest names reach the user's terminal; a full disk blamed on the guest -------

def test_guest_names_in_the_setuid_warning_cannot_drive_the_terminal(tmp_path, staging):
    """`boxlite cp` prints this warning: a setuid file named with escape sequences set the
    terminal title / cleared the screen (and a lone surrogate made printing fail)."""
    evil = "t/\x1b]0;pwned\x07\x1b[2J\rok \udcff"
    data = Craft().dir("t").file(evil, b"x", 0o4755).bytes()
    with pytest.warns(UserWarning) as caught:
        _copy(data, "/t", tmp_path / "dest", staging)
    text = str(caught[0].message)
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    text.encode("utf-8")  # printable: no lone surrogate
    assert "\\x1b]0;pwned" in text


def test_guest_names_in_placement_errors_are_escaped(tmp_path, staging):
    dest = tmp_path / "dest"
    (dest / "t" / "\x1b[2Jd").mkdir(parents=True)
    data = Craft().dir("t").file("t/\x1b[2Jd", b"x").bytes()
    with pytest.raises(ConfigError) as caught:
        _copy(data, "/t", dest, staging)
    assert "\x1b" not in str(caught.value) and "\\x1b[2Jd" in str(caught.value)


def test_disk_filling_up_while_staging_is_not_blamed_on_the_guest(tmp_path, staging,
                                                                  monkeypatch):
    """Another writer fills the staging filesystem after the size check: that was reported
    as ArchiveRefused (a GuestError, "the guest's archive broke a rule")."""
    import boxlite_core.transfer.untar as untar_mod

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(untar_mod.os, "write", full)
    with pytest.raises(DiskSpaceError, match="filled up while staging"):
        _copy(Craft().file("f", b"x").bytes(), "/f", tmp_path / "dest", staging)
    assert list(staging.iterdir()) == [] and not (tmp_path / "dest").exists()


_UNPRIVILEGED_INTERRUPTED = r"""
import os, sys
from boxlite_testing.tarcraft import Craft
import boxlite_core.transfer.place as place_mod
from boxlite_core.transfer import parse_guest_path, receive_tree
dest, staging = sys.argv[2], sys.argv[3]
real = os.rename
def rename(src, dst, **kw):
    if str(src).startswith(".boxlite-cp-"):
        raise KeyboardInterrupt  # Ctrl-C just before the copied tree is renamed into place
    return real(src, dst, **kw)
place_mod.os.rename = rename
data = Craft().dir("t").dir("t/ro", 0o555).file("t/ro/f", b"F").dir("t/z", 0).bytes()
try:
    receive_tree([data], parse_guest_path("/t"), dest, staging=staging)
except KeyboardInterrupt:
    pass
assert os.listdir(dest) == [], "left in DEST: " + repr(os.listdir(dest))
assert os.listdir(staging) == [], "left in staging: " + repr(os.listdir(staging))
print("ok")
"""


def test_interrupted_cross_fs_copy_leaves_no_half_tree_in_dest(tmp_path, staging, other_fs):
    """Cross-fs, a user without CAP_DAC_OVERRIDE, Ctrl-C before the final rename: the
    half-copied `.boxlite-cp-*` tree stayed in DEST (rmtree cannot empty its 0555 dir)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    ran = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c",
         _UNPRIVILEGED_INTERRUPTED, str(REPO), str(other_fs), str(staging)],
        capture_output=True, text=True, timeout=60,
    )
    assert ran.returncode == 0 and "ok" in ran.stdout, ran.stderr[-2000:]


# -- a device, pipe or terminal named as DEST -----------------------------------------------

@pytest.mark.parametrize("what", ["device", "link-to-stdout", "link-to-device", "fifo"])
def test_dest_that_is_a_device_or_a_stream_is_not_replaced(tmp_path, staging, what):
    """`boxlite cp BOX:/log /dev/null` (or /dev/stdout, a link to /proc/self/fd/1) as root
    replaced the system's device node or link with the guest's file."""
    dest = tmp_path / "out"
    if what == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(dest, 0o666 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers
    elif what == "fifo":
        os.mkfifo(dest)
    elif what == "link-to-device":
        dest.symlink_to(os.devnull)
    else:
        dest.symlink_to("/proc/self/fd/1")
        if not os.path.exists(dest):
            pytest.skip("no fd 1")
    before = os.lstat(dest)
    with pytest.raises(ConfigError, match="does not replace it"):
        _copy(Craft().file("log", b"guest data").bytes(), "/var/log", dest, staging)
    after = os.lstat(dest)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert list(staging.iterdir()) == []
