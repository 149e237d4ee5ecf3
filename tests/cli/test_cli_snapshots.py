"""`boxlite snapshot save/ls/rm`, `run/create --snapshot`, `fork`, `--no-template`.

Fast tests: argument handling and errors without a VM, and `create --snapshot` over a
snapshot record made here (a sealed directory; no VM is started). VM tests (`-m vm`, the
shared home): one source box, one snapshot, one `run --snapshot`, one `fork -n 2`, and one
`--no-template` cold boot.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from boxlite_core.cli.run import box_options, split_image
from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.runtime.runtime import Runtime
from boxlite_core.runtime.savedstate import seal
from boxlite_core.runtime.snapshots import Snapshot
from boxlite_testing.cli import boxlite
from boxlite_testing.homes import unique

# -- no VM ---------------------------------------------------------------------------------


def _one_error(proc, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("boxlite: error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["snapshot", "rm", "nosuch"], 3, "no snapshot named 'nosuch'"),
        (["snapshot", "save", "nobox", "s1"], 3, "no box 'nobox'"),
        (["run", "--snapshot", "nosuch", "--", "true"], 3, "no snapshot named 'nosuch'"),
        (["create", "--snapshot", "nosuch"], 3, "no snapshot named 'nosuch'"),
        (["run", "--snapshot", "bad name!", "true"], 2, "snapshot"),
        (["create"], 2, "Missing argument 'IMAGE'"),
        (["create", "--cpus", "2"], 2, "--snapshot NAME"),
        (["fork", "nobox"], 3, "no box 'nobox'"),
        (["fork", "-n", "0", "nobox"], 2, "-n"),
        (["snapshot", "rm"], 2, "Missing argument"),
    ],
)
def test_argument_errors_are_one_line(tmp_path, args, code, needle):
    _one_error(boxlite(*args, home=tmp_path / "home"), code, needle)


def test_empty_listing(tmp_path):
    home = tmp_path / "home"
    assert json.loads(boxlite("snapshot", "ls", "--json", home=home).stdout) == []
    assert boxlite("snapshot", "ls", home=home).stdout.split() == [
        "NAME", "BOX", "IMAGE", "CREATED", "SIZE", "FLAGS"]


def test_run_arguments_with_and_without_snapshot():
    """With --snapshot every positional argument is CMD; without, the first is IMAGE."""
    assert split_image(("busybox", "--", "echo", "hi"), None) == ("busybox", ["echo", "hi"])
    assert split_image(("busybox",), None) == ("busybox", [])
    assert split_image(("echo", "hi"), "s1") == (None, ["echo", "hi"])
    assert split_image(("--", "echo"), "s1") == (None, ["echo"])
    assert split_image((), "s1") == (None, [])
    with pytest.raises(ConfigError, match="Missing argument 'IMAGE'"):
        split_image((), None)


def test_unset_options_are_not_passed():
    """What the CLI builds when nothing is set is BoxOptions' defaults, and it says so:
    a box from a snapshot is then refused nothing."""
    empty = dict(image=None, snapshot="s1", no_template=False, backend=None, auto_remove=False,
                 name=None, volumes=(), env=(), workdir=None, user=None, cpus=None,
                 memory=None, rootfs=None, sharer=None, console_mib=None)
    options, given = box_options(**empty)
    assert options == BoxOptions(snapshot="s1") and given == {"snapshot"}
    options, given = box_options(**{**empty, "cpus": 1, "no_template": True})
    assert options.cpus == 1 and not options.template and given == {"snapshot", "cpus"}


def _fake_snapshot(home: Path, name: str) -> None:
    """A complete snapshot record of a 2-CPU, 256 MiB busybox box, without disks (nothing
    here starts it: `create` only reads its record and sealed state)."""
    with Runtime(home) as rt:
        store = rt.services.snapshots
        snap = Snapshot(
            name=name, id="0123456789ab", box_id="ba5eba11ba5e", box_name="origin",
            backend="qemu", created_at=time.time(), directory=store.root / name,
            options=BoxOptions(image="busybox", cpus=2, memory_mib=256, name="origin"),
            image_digest=None, image_config=None, disks=(),
        )
        store.reserve(snap)
        snap.state_dir.mkdir(parents=True)
        (snap.state_dir / "vmstate").write_bytes(b"\0" * 4096)
        seal(snap.state_dir, {"snapshot": name, "key": "k", "backend": "qemu"})
        store.mark_complete(name)


def test_create_from_snapshot_takes_its_options(tmp_path):
    home = tmp_path / "home"
    _fake_snapshot(home, "snap1")
    proc = boxlite("create", "--snapshot", "snap1", "--name", "c1", "-e", "A=1", home=home)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(boxlite("inspect", "c1", home=home).stdout)
    assert info["id"] == proc.stdout.strip() and info["status"] == "configured"
    opts = info["options"]
    assert (opts["snapshot"], opts["image"], opts["cpus"], opts["memory_mib"]) == (
        "snap1", "busybox", 2, 256)
    assert opts["env"] == {"A": "1"} and opts["template"] is True
    proc = boxlite("create", "--snapshot", "snap1", "--no-template", "--cpus", "2", home=home)
    assert proc.returncode == 0, proc.stderr  # the snapshot's own value: not a conflict
    info = json.loads(boxlite("inspect", proc.stdout.strip(), home=home).stdout)
    assert info["options"]["template"] is False
    # what the VM fixes cannot be set: another value, or the default value set on purpose
    for args, needle in ((["--memory", "384"], "memory_mib=384"),
                         (["--memory", "512"], "memory_mib=512"),
                         (["--cpus", "1"], "cpus=1"),
                         (["--rootfs", "merged"], "rootfs='merged'")):
        _one_error(boxlite("create", "--snapshot", "snap1", *args, home=home), 2, needle)
    _one_error(boxlite("create", "--snapshot", "snap1", "alpine:3", home=home), 2,
               "image='alpine:3'")
    _one_error(boxlite("run", "--snapshot", "snap1", "--memory", "512", "--", "true",
                       home=home), 2, "leave memory_mib unset")
    listed = json.loads(boxlite("snapshot", "ls", "--json", home=home).stdout)
    assert [(s["name"], s["box"], s["complete"], s["auto"]) for s in listed] == [
        ("snap1", "origin", True, False)]
    row = boxlite("snapshot", "ls", home=home).stdout.splitlines()[1].split()
    assert row[:3] == ["snap1", "origin", "busybox"] and row[-1] == "-"
    proc = boxlite("snapshot", "rm", "snap1", "nosuch", home=home)
    assert proc.returncode == 3 and proc.stdout.split() == ["snap1"]
    assert "no snapshot named 'nosuch'" in proc.stderr
    assert not (home / "snapshots" / "snap1").exists()


# -- real VMs --------------------------------------------------------------------------------

#: a command running in the background of the source box when it is saved: one line a second
COUNTER = "echo before > /tmp/f; while :; do date +%s >> /tmp/c; sleep 1; done"


def _ok(home: Path, *args: str, timeout_note: str = "") -> str:
    proc = boxlite(*args, home=home)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr, timeout_note)
    return proc.stdout


def _lines(home: Path, box: str) -> int:
    return int(_ok(home, "exec", box, "--", "sh", "-c", "wc -l < /tmp/c").strip())


def _grows(home: Path, box: str) -> bool:
    """Whether the counter of COUNTER still runs in ``box`` (its file grows)."""
    first = _lines(home, box)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.5)
        if _lines(home, box) > first:
            return True
    return False


@pytest.mark.vm
def test_snapshot_run_fork_from_the_cli(shared_home):
    home = shared_home
    src, snap, clone = unique("snapsrc"), unique("snap"), unique("snapclone")
    boxes = [src, clone, f"{clone}-1", f"{clone}-2"]
    snaps = [snap]
    try:
        _ok(home, "run", "-d", "--name", src, "--memory", "256", "busybox", "--",
            "sh", "-c", COUNTER)
        assert _grows(home, src)
        assert _ok(home, "snapshot", "save", src, snap).strip() == snap
        listed = {s["name"]: s for s in json.loads(_ok(home, "snapshot", "ls", "--json"))}
        assert listed[snap]["box"] == src and listed[snap]["complete"] and not listed[snap]["auto"]
        assert listed[snap]["disk_usage_bytes"] > 10 * 2**20  # the saved memory, at least
        assert _ok(home, "exec", src, "--", "cat", "/tmp/f").strip() == "before"  # runs on

        # run --snapshot: no IMAGE, CMD runs in the clone; what was in /tmp and the
        # background counter came along
        proc = boxlite("run", "--rm", "--snapshot", snap, "--", "sh", "-c",
                       "cat /tmp/f; a=$(wc -l < /tmp/c); sleep 3; b=$(wc -l < /tmp/c); "
                       "[ $b -gt $a ] && echo counting", home=home)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["before", "counting"], proc.stdout

        # fork -n 2: two running copies of the source, which runs on
        out = json.loads(_ok(home, "fork", src, "-n", "2", "--name", clone, "--json"))
        assert [c["name"] for c in out] == [f"{clone}-1", f"{clone}-2"]
        snaps.insert(0, out[0]["snapshot"])  # removed first: its disk is over snap's
        info = json.loads(_ok(home, "inspect", f"{clone}-1"))
        assert info["status"] == "running" and info["state"]["boot"]["source"] == "snapshot"
        assert _grows(home, f"{clone}-2")
        _ok(home, "exec", f"{clone}-1", "--", "sh", "-c", "echo mine > /tmp/f")
        for other in (src, f"{clone}-2"):  # clones diverge
            assert _ok(home, "exec", other, "--", "cat", "/tmp/f").strip() == "before"
        auto = {s["name"]: s for s in json.loads(_ok(home, "snapshot", "ls", "--json"))}
        assert auto[out[0]["snapshot"]]["auto"] is True

        # the snapshot's frozen disk backs the source and the copies: rm is refused, named
        proc = boxlite("snapshot", "rm", snap, home=home)
        assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert src in proc.stderr and f"{clone}-1" in proc.stderr, proc.stderr
        assert "remove those boxes first" in proc.stderr

        # the source's start made (or used) the template of its layout; ls shows it
        state = json.loads(_ok(home, "inspect", src))["state"]
        if os.environ.get("BOXLITE_TEMPLATES", "on") != "off" and state.get("layout_key"):
            keys = [t["key"] for t in json.loads(_ok(home, "templates", "ls", "--json"))]
            assert state["layout_key"] in keys, (state["boot"], keys)
    finally:
        boxlite("rm", "-f", *boxes, home=home)
        for name in snaps:
            boxlite("snapshot", "rm", name, home=home)
    left = {s["name"] for s in json.loads(_ok(home, "snapshot", "ls", "--json"))}
    assert not left & set(snaps)


@pytest.mark.vm
def test_no_template_boots_the_kernel(shared_home):
    home = shared_home
    name = unique("notemplate")
    try:
        _ok(home, "create", "--no-template", "--name", name, "--memory", "256", "busybox")
        _ok(home, "start", name)
        boot = json.loads(_ok(home, "inspect", name))["state"]["boot"]
        assert boot["source"] == "kernel" and boot["reason"] == "template=False", boot
        assert _ok(home, "exec", name, "--", "echo", "up").strip() == "up"
    finally:
        boxlite("rm", "-f", name, home=home)
