"""Box.copy_out end to end over the real gRPC transport, with the agent run natively.

``double_box``: a hostile guest (test double: the real agent whose Download serves crafted
tar streams). ``native_box``: the real, honest agent; its container root (``guest_root``) is
what the guest sees, so files made there are the guest's files.
"""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from boxlite_core.errors import BoxliteError, GuestError
from boxlite_testing.tarcraft import Craft, crafted_name, cve_2025_4517


def _serve(streams, path: str, data: bytes) -> None:
    (streams / crafted_name(path)).write_bytes(data)


@pytest.fixture
def area(tmp_path):
    outer = tmp_path / "outer"
    dest = outer / "dest"
    dest.mkdir(parents=True)
    (outer / "victim").write_text("original\n")
    return outer, dest


def test_double_agent_cve_2025_4517_chain_writes_nothing_outside(double_box, streams, area):
    outer, dest = area
    path = f"/top{uuid.uuid4().hex[:6]}"
    top = path[1:]
    # sized for where the old copy-out extracted: DEST/.boxlite-cp-XXXXXXXX/out
    _serve(streams, path, cve_2025_4517(top, len(str(dest)) + 25, 3, "victim"))
    refused = None
    try:
        double_box.copy_out(path, dest)
    except BoxliteError as exc:
        refused = exc
    assert (outer / "victim").read_text() == "original\n", "the guest overwrote a host file"
    assert sorted(p.name for p in outer.iterdir()) == ["dest", "victim"], "and created one"
    assert isinstance(refused, GuestError) and "below a symlink" in str(refused)
    assert list(dest.iterdir()) == []


def test_double_agent_archive_name_cannot_pick_the_host_path(double_box, streams, area):
    """Request /x; the guest answers with .ssh/authorized_keys (finding b)."""
    _outer, dest = area
    _serve(streams, "/x", Craft().dir(".ssh", 0o700)
           .file(".ssh/authorized_keys", b"ssh-ed25519 AAAA attacker\n").bytes())
    with pytest.raises(GuestError, match="requested entry 'x'"):
        double_box.copy_out("/x", dest)
    assert not (dest / ".ssh").exists() and list(dest.iterdir()) == []


def test_double_agent_setuid_file_arrives_without_setuid(double_box, streams, area):
    _outer, dest = area
    _serve(streams, "/bin/tool", Craft().file("tool", b"\x7fELF", 0o4755).bytes())
    with pytest.warns(UserWarning, match="setuid"):
        double_box.copy_out("/bin/tool", dest)
    assert stat.S_IMODE(os.lstat(dest / "tool").st_mode) == 0o755


# -- the honest agent ---------------------------------------------------------------------

@pytest.fixture
def guest_tree(guest_root):
    """/srv/<id>/t in the guest: what `cp -a` must keep."""
    name = uuid.uuid4().hex[:8]
    base = guest_root / "srv" / name
    t = base / "t"
    (t / "shared").mkdir(parents=True)
    os.chmod(t, 0o775)
    os.chmod(t / "shared", 0o2775)
    (t / "shared/notes").write_text("group-writable\n")
    os.chmod(t / "shared/notes", 0o664)
    (t / "abs").symlink_to("/etc/passwd")
    (t / "rel").symlink_to("shared/notes")
    (t / "dangling").symlink_to("/no/such")
    (base / "link").symlink_to("/etc/passwd")
    return f"/srv/{name}", t


def test_agent_tree_round_trips_like_cp_a(native_box, guest_tree, tmp_path):
    guest, _src = guest_tree
    out = native_box.copy_out(f"{guest}/t", tmp_path)
    assert out == tmp_path / "t"
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(out / "shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(out / "shared/notes").st_mode) == 0o664
    assert os.readlink(out / "abs") == "/etc/passwd"
    assert os.readlink(out / "rel") == "shared/notes"
    assert os.readlink(out / "dangling") == "/no/such"
    assert (out / "shared/notes").read_text() == "group-writable\n"


def test_agent_single_symlink_copies_as_a_link(native_box, guest_tree, tmp_path):
    guest, _ = guest_tree
    out = native_box.copy_out(f"{guest}/link", tmp_path)
    assert out == tmp_path / "link" and os.readlink(out) == "/etc/passwd"


def test_agent_dir_dot_copies_contents(native_box, guest_tree, tmp_path):
    guest, _ = guest_tree
    dest = tmp_path / "existing"
    dest.mkdir()
    assert native_box.copy_out(f"{guest}/t/.", dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["abs", "dangling", "rel", "shared"]
    fresh = tmp_path / "fresh"
    assert native_box.copy_out(f"{guest}/t", fresh) == fresh  # missing DEST: DEST is the copy
    assert (fresh / "shared/notes").exists() and not (fresh / "t").exists()


def test_agent_copy_into_dir_with_planted_link_stays_inside(native_box, guest_tree, area):
    """The destination is a directory the guest can write: it planted t -> outside."""
    outer, dest = area
    guest, _ = guest_tree
    (dest / "t").symlink_to(outer)
    native_box.copy_out(f"{guest}/t", dest)
    assert not (dest / "t").is_symlink() and (dest / "t/shared/notes").exists()
    assert sorted(p.name for p in outer.iterdir()) == ["dest", "victim"]


def test_agent_hostile_guest_dir_copied_by_honest_agent(native_box, guest_root, area):
    """A guest-made directory full of traps, sent faithfully: links stay inert, setuid goes,
    a device node refuses the copy and leaves nothing behind."""
    outer, dest = area
    name = uuid.uuid4().hex[:8]
    trap = guest_root / "srv" / name / "trap"
    (trap / "sub").mkdir(parents=True)
    (trap / "up").symlink_to("../../../../../../../..")
    (trap / "etc").symlink_to("/etc")
    (trap / "sub/victim").symlink_to(str(outer / "victim"))
    (trap / "suid").write_bytes(b"\x7fELF")
    os.chmod(trap / "suid", 0o4755)
    with pytest.warns(UserWarning, match="suid"):
        out = native_box.copy_out(f"/srv/{name}/trap", dest)
    assert os.readlink(out / "up") == "../../../../../../../.."
    assert os.readlink(out / "sub/victim") == str(outer / "victim")
    assert stat.S_IMODE(os.lstat(out / "suid").st_mode) == 0o755
    assert (outer / "victim").read_text() == "original\n"

    os.mknod(trap / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    fresh = outer / "fresh"
    with pytest.raises(GuestError, match="device"):
        native_box.copy_out(f"/srv/{name}/trap", fresh)
    assert not fresh.exists() and sorted(p.name for p in outer.iterdir()) == ["dest", "victim"]
