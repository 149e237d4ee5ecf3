"""Copy-out against a real VM: a guest that can write the destination (a rw volume) plants a
link there, and the copy must not write through it; `cp -a` semantics on a real guest tree.

Slow under TCG (`-m vm`): one box per volume sharer (9p, virtiofs), shared by the module.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.tools import find_tool

pytestmark = pytest.mark.vm

HOME = Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home")

GUEST_TREE = (
    "set -e; rm -rf /srv/t; mkdir -p /srv/t/shared /srv/t/ro; "
    "chmod 0775 /srv/t; chmod 2775 /srv/t/shared; "
    "echo group-writable > /srv/t/shared/notes; chmod 0664 /srv/t/shared/notes; "
    "echo inside > /srv/t/ro/f; chmod 0555 /srv/t/ro; "
    "ln -s /etc/passwd /srv/t/abs; ln -s shared/notes /srv/t/rel; ln -s /no/such /srv/t/dangling; "
    "ln -sfn /etc/passwd /srv/link; "
    "rm -rf /srv/p; mkdir -p /srv/p/sub; echo from-guest > /srv/p/sub/f; echo g > /srv/p/g"
)


@pytest.fixture(scope="module")
def runtime():
    HOME.mkdir(parents=True, exist_ok=True)
    with Runtime(HOME) as rt:
        yield rt


@pytest.fixture(scope="module", params=["9p", "virtiofs"])
def vm(request, runtime, tmp_path_factory):
    """(box, rw volume host dir, a host dir outside the volume the guest must not reach)."""
    sharer = request.param
    if sharer not in runtime.plugins.sharer_names():
        pytest.skip(f"the {sharer} volume sharer is not registered")
    if sharer == "virtiofs" and find_tool("virtiofsd") is None:
        pytest.skip("virtiofsd is not installed")
    root = tmp_path_factory.mktemp(f"copyvm-{sharer}")
    vol, outside = root / "vol", root / "outside"
    vol.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("original\n")
    box = runtime.create(BoxOptions(
        image="busybox", name=f"copyvm-{secrets.token_hex(3)}", memory_mib=256,
        volumes=[f"{vol}:/mnt/rw"], volume_sharer=sharer,
    ))
    try:
        box.start()
        made = box.exec(["sh", "-c", GUEST_TREE])
        assert made.ok, made.stderr
        yield box, vol, outside
    finally:
        runtime.remove(box.id, force=True)


def test_guest_planted_link_in_rw_volume_is_not_followed(vm):
    box, vol, outside = vm
    # the guest plants /mnt/rw/p -> <host dir outside the volume>, then we copy /srv/p there
    planted = box.exec(["ln", "-s", str(outside), "/mnt/rw/p"])
    assert planted.ok, planted.stderr
    real_link = (vol / "p").is_symlink()  # virtiofs: a host symlink; 9p mapped-xattr: a file
    if real_link:
        box.copy_out("/srv/p", vol)
    else:  # a regular file where the directory lands: refused, as docker cp does
        with pytest.raises(ConfigError, match="directory onto the file"):
            box.copy_out("/srv/p", vol)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"], (
        f"copy-out wrote through the guest's link (host symlink: {real_link})")
    assert (outside / "victim").read_text() == "original\n"
    if real_link:
        assert not (vol / "p").is_symlink() and (vol / "p/sub/f").read_text() == "from-guest\n"


def test_guest_tree_copies_like_cp_a(vm, tmp_path):
    box, _, _ = vm
    out = box.copy_out("/srv/t", tmp_path)
    assert out == tmp_path / "t"
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(out / "shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(out / "shared/notes").st_mode) == 0o664
    assert stat.S_IMODE(os.lstat(out / "ro").st_mode) == 0o555
    assert os.readlink(out / "abs") == "/etc/passwd"
    assert os.readlink(out / "dangling") == "/no/such"
    assert (out / "rel").read_text() == "group-writable\n"


def test_single_symlink_and_dir_contents(vm, tmp_path):
    box, _, _ = vm
    link = box.copy_out("/srv/link", tmp_path)
    assert link == tmp_path / "link" and os.readlink(link) == "/etc/passwd"
    dest = tmp_path / "existing"
    dest.mkdir()
    assert box.copy_out("/srv/t/.", dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["abs", "dangling", "rel", "ro", "shared"]
