"""CLI over a home populated through the Python API (no VM: the backend double fails)."""

from __future__ import annotations

import json

import pytest

from boxlite_core.errors import EngineError
from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.cli import boxlite


@pytest.fixture
def layout(tmp_path):
    return doubles.make_oci_layout(tmp_path / "layout", {"bin/x": b"x"}, {"Cmd": ["/bin/x"]})


def test_images_import_ls_rm(tmp_path, layout):
    home = tmp_path / "home"
    proc = boxlite("images", "import", str(layout), "--name", "tiny:1", home=home)
    assert proc.returncode == 0, proc.stderr
    ref, digest = proc.stdout.split()
    assert ref == "tiny:1" and digest.startswith("sha256:")
    listed = json.loads(boxlite("images", "ls", "--json", home=home).stdout)
    assert [i["reference"] for i in listed] == ["tiny:1"]
    proc = boxlite("run", "nosuch:1", "--", "true", home=home)
    assert proc.returncode == 3 and proc.stderr.startswith("boxlite: error: image 'nosuch:1'")
    assert boxlite("images", "rm", "tiny:1", home=home).returncode == 0
    assert json.loads(boxlite("images", "ls", "--json", home=home).stdout) == []


def test_failed_box_visible_and_removable(tmp_path, layout):
    rt = doubles.make_runtime(tmp_path)
    rt.images.import_path(layout, name=doubles.TINY)
    box = rt.create(doubles.opts(name="broken"))
    with pytest.raises(EngineError):
        box.start()
    rt.close()
    home = tmp_path / "home"
    assert boxlite("ls", "--json", home=home).stdout.strip() == "[]"  # not running
    rows = json.loads(boxlite("ls", "-a", "--json", home=home).stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("broken", "failed")]
    info = json.loads(boxlite("inspect", "broken", home=home).stdout)
    assert info["state"]["failed_stage"] == "vmm_spawn" and "vmm_spawn" in info["error"]
    assert "failed (vmm_spawn" in boxlite("ls", "-a", home=home).stdout
    proc = boxlite("images", "rm", doubles.TINY, home=home)
    assert proc.returncode != 0 and "used by a box" in proc.stderr
    metrics = json.loads(boxlite("metrics", "--json", home=home).stdout)
    assert metrics["boxes_failed"] == 1 and metrics["boxes_created"] == 1
    proc = boxlite("rm", "broken", home=home)
    assert proc.returncode == 0, proc.stderr
    assert not box.dir.exists()
    assert json.loads(boxlite("ls", "-a", "--json", home=home).stdout) == []
