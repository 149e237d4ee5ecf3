"""Issue 17 item 7: 9p loses ftruncate/fchmod on open-but-unlinked files (QEMU's 9p server
works by path). Not ours to fix, so declared: the sharer states it, naming the sharer prints
it, and virtiofs stays the default wherever virtiofsd runs. The behaviour itself is checked
in a VM by the conformance suite (tier2_storage TestVolumes, expected to fail on 9p)."""

from __future__ import annotations

import pytest

from boxlite_core.plugins import PluginRegistry
from boxlite_core.runtime.pipeline import StartContext, pick_sharer
from boxlite_core.tools import find_tool
from boxlite_core.vmm.spec import Capability
from boxlite_core.volumes import virtiofs
from boxlite_core.volumes.base import SharerLimitationWarning
from boxlite_core.volumes.ninep import OPEN_UNLINKED
from boxlite_testing.cli import boxlite
from boxlite_testing.runtime_doubles import make_runtime, opts

BOTH = frozenset({Capability.NINEP, Capability.VIRTIOFS})


def test_9p_declares_the_open_unlinked_limitation_and_virtiofs_none():
    registry = PluginRegistry(load_entry_points=False)
    assert registry.volume_sharer("9p").limitations == (OPEN_UNLINKED,)
    assert OPEN_UNLINKED.name == "open-unlinked-fd"
    assert "ftruncate and fchmod" in OPEN_UNLINKED.summary
    assert "--sharer virtiofs" in OPEN_UNLINKED.summary  # what to use instead
    assert registry.volume_sharer("virtiofs").limitations == ()


@pytest.fixture
def rt(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLITE_HOME", str(tmp_path / "home"))
    from boxlite_testing import runtime_doubles as doubles

    runtime = make_runtime(tmp_path)
    layout = doubles.make_oci_layout(tmp_path / "layout", {"bin/x": b"x"}, {"Cmd": ["x"]})
    runtime.images.import_path(layout, name=doubles.TINY)
    yield runtime
    runtime.close()


def test_creating_a_box_with_9p_warns_and_with_virtiofs_not(rt, recwarn):
    with pytest.warns(SharerLimitationWarning, match=r"^volume sharer 9p: a file that is open"):
        rt.create(opts(volume_sharer="9p"))
    recwarn.clear()
    rt.create(opts(volume_sharer="virtiofs"))
    rt.create(opts())  # no sharer named: nothing to warn about at create
    assert [w for w in recwarn if issubclass(w.category, SharerLimitationWarning)] == []


@pytest.mark.parametrize("command", ["create", "run"])
def test_cli_sharer_9p_prints_the_limitation_on_stderr(tmp_path, command):
    """`run` boots nothing here: --entrypoint '' with no command is refused right after the
    create, which is where the warning comes from."""
    home = tmp_path / "home"
    extra = ["--entrypoint", ""] if command == "run" else []
    proc = boxlite(command, "--sharer", "9p", *extra, "busybox", home=home)
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"boxlite: warning: volume sharer 9p: {OPEN_UNLINKED.summary}"]
    if command == "create":
        assert proc.returncode == 0 and len(proc.stdout.split()) == 1  # just the id
        quiet = boxlite("create", "--sharer", "virtiofs", "busybox", home=home)
        assert quiet.returncode == 0 and quiet.stderr == ""


def _context(rt, **options) -> StartContext:
    box = rt.create(opts(**options))
    record = box.record
    return StartContext(services=rt.services, record=record, box_dir=box.dir,
                        backend=rt.plugins.backend(record.backend))


@pytest.mark.skipif(find_tool("virtiofsd") is None, reason="virtiofsd is not installed")
def test_default_selection_picks_virtiofs_where_virtiofsd_runs(rt):
    name, sharer = pick_sharer(_context(rt), BOTH)
    assert name == "virtiofs" and sharer.limitations == ()


def test_default_selection_falls_back_to_9p_without_virtiofsd_double(rt, monkeypatch):
    """No virtiofsd on PATH (the lookup a double returning None): 9p, the only other."""
    monkeypatch.setattr(virtiofs.tools, "find_tool",
                        lambda name: None if name == "virtiofsd" else find_tool(name))
    assert pick_sharer(_context(rt), BOTH)[0] == "9p"
    assert pick_sharer(_context(rt), frozenset({Capability.NINEP}))[0] == "9p"


def test_a_named_sharer_is_kept_even_with_virtiofsd_there(rt):
    with pytest.warns(SharerLimitationWarning):
        context = _context(rt, volume_sharer="9p")
    assert pick_sharer(context, BOTH)[0] == "9p"
