"""`boxlite templates ls/rm/prune`, the `doctor` line, and `guest build`'s prune, on a home
whose guest kit and templates are made here (no VM: a template is a sealed directory).

The "current" kit is a directory named with the kit id this tree's recipe gives (what
`find_kit` looks up), so the CLI, which never builds a kit for these commands, finds it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from boxlite_core.kit import KitRecipe, kit_cache_dir
from boxlite_core.kit.builder import INITRD_FILE, KERNEL_FILE, KIT_FILE, MANIFEST_FILE, ROOT_FILE
from boxlite_core.runtime.templates import STALE_WORK_SECONDS, TemplateStore, templates_dir
from boxlite_testing.cli import boxlite


def _fake_kit(home: Path) -> str:
    """A kit directory for this tree's recipe (empty files): `find_kit` returns it."""
    kit_id = KitRecipe.current("x86_64").kit_id()
    kit_dir = kit_cache_dir(home) / "kits" / kit_id
    kit_dir.mkdir(parents=True)
    for name in (KERNEL_FILE, INITRD_FILE, ROOT_FILE, MANIFEST_FILE):
        (kit_dir / name).write_bytes(b"")
    (kit_dir / KIT_FILE).write_text(json.dumps({"kit_id": kit_id, "arch": "x86_64"}))
    return kit_id


def _template(home: Path, key: str, kit_id: str, *, size: int = 1000) -> None:
    meta = {"kit_id": kit_id, "backend": "qemu", "cpus": 1, "memory_mib": 256, "box": "maker"}
    made = TemplateStore(home).make(
        key, meta, lambda d: (d / "vmstate").write_bytes(b"\0" * size))
    assert made is not None


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with the current kit, a template of it (``cur``), one of an old kit
    (``old``), a broken one (``bad``: no manifest) and an interrupted save's leftover."""
    home = tmp_path / "home"
    kit_id = _fake_kit(home)
    _template(home, "cur", kit_id, size=2_000_000)
    _template(home, "old", "0ldk1t")
    (templates_dir(home) / "bad").mkdir()
    (templates_dir(home) / "bad" / "vmstate").write_bytes(b"x")
    leftover = templates_dir(home) / ".cur-leftover"
    leftover.mkdir()
    # an interrupted save's work dir, long ago (a young one may be another start's save)
    old_time = time.time() - STALE_WORK_SECONDS - 60
    os.utime(leftover, (old_time, old_time))
    young = templates_dir(home) / ".saving-now"
    young.mkdir()  # another start is saving right now: never pruned
    return home


def test_size_is_what_a_template_takes_on_disk(tmp_path: Path):
    """A qemu memory image is as long as the guest's memory but mostly holes: the SIZE a
    user weighs against their disk is what is allocated."""
    home = tmp_path / "home"
    kit_id = _fake_kit(home)

    def sparse(directory: Path) -> None:
        with open(directory / "qemu-ram", "wb") as fh:
            fh.truncate(512 << 20)
            fh.seek(64 << 20)
            fh.write(b"\1" * (1 << 20))

    meta = {"kit_id": kit_id, "backend": "qemu", "cpus": 1, "memory_mib": 512, "box": "m"}
    assert TemplateStore(home).make("img", meta, sparse) is not None
    proc = boxlite("templates", "ls", "--json", home=home)
    (row,) = json.loads(proc.stdout)
    assert (1 << 20) <= row["size_bytes"] < (2 << 20), row


def _keys(home: Path) -> list[str]:
    proc = boxlite("templates", "ls", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    return [t["key"] for t in json.loads(proc.stdout)]


def test_ls_shows_templates_and_doctor_counts_them(home):
    proc = boxlite("templates", "ls", "--json", home=home)
    rows = {t["key"]: t for t in json.loads(proc.stdout)}
    assert sorted(rows) == ["cur", "old"]  # a broken one does not load: not listed
    assert rows["old"]["kit_id"] == "0ldk1t"
    assert 2_000_000 <= rows["cur"]["size_bytes"] <= 2_000_000 + 8192  # whole disk blocks
    assert rows["cur"]["made_by_box"] == "maker" and rows["cur"]["memory_mib"] == 256
    table = boxlite("templates", "ls", home=home).stdout.splitlines()
    assert table[0].split() == ["KEY", "BACKEND", "KIT", "CPUS", "MEMORY", "SIZE", "CREATED",
                                "MADE", "BY"]
    assert any(line.startswith("cur ") and "256MiB" in line and "2.0MB" in line
               for line in table), table
    doctor = boxlite("doctor", home=home).stdout
    line = next(x for x in doctor.splitlines() if " templates: " in x)
    # bad + the leftover (broken) + old (another kit); no database yet: no snapshot count
    assert line.startswith("warn templates: 2 boot template(s) (2.0MB); 3 broken"), line
    assert "boxlite templates prune" in line


def test_prune_keeps_only_the_current_kits(home):
    proc = boxlite("templates", "prune", home=home)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == [".cur-leftover", "bad", "old"]
    # the save in progress is not a leftover yet
    assert sorted(p.name for p in templates_dir(home).iterdir()) == [".saving-now", "cur"]
    doctor = boxlite("doctor", home=home).stdout
    assert "ok   templates: 1 boot template(s) (2.0MB)" in doctor, doctor


def test_rm_by_key_and_all(home):
    proc = boxlite("templates", "rm", "old", "nosuch", home=home)
    assert proc.returncode == 3 and proc.stdout.split() == ["old"]
    assert proc.stderr.splitlines() == [
        "boxlite: error: no boot template nosuch; `boxlite templates ls` lists them"]
    for args in (["templates", "rm"], ["templates", "rm", "--all", "cur"]):
        proc = boxlite(*args, home=home)
        assert proc.returncode == 2 and "give template KEYs or --all" in proc.stderr, args
    for key in ("..", ".", "../templates", ""):  # never a path out of the store
        assert boxlite("templates", "rm", key, home=home).returncode == 3, key
    assert _keys(home) == ["cur"]
    proc = boxlite("templates", "rm", "--all", home=home)
    assert proc.returncode == 0 and sorted(proc.stdout.split()) == [".cur-leftover", "bad", "cur"]
    assert [p.name for p in templates_dir(home).iterdir()] == [".saving-now"]


def test_guest_build_prunes_templates_of_other_kits(home):
    """The kit is found (not rebuilt): the command still removes what no start can use."""
    proc = boxlite("guest", "build", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == KitRecipe.current("x86_64").kit_id()
    assert "removed 3 boot template(s): broken or of other guest kits" in proc.stderr
    assert _keys(home) == ["cur"]
