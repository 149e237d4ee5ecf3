"""9p sharer: nothing runs on the host; specs carry kind, read-only and owner through."""

from __future__ import annotations

from pathlib import Path

from boxlite_core.models import HostShare
from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import Capability
from boxlite_core.volumes.ninep import NinePSharer


def test_start_returns_specs_in_order(tmp_path: Path) -> None:
    shares = [HostShare("a", tmp_path, True, 1000, 1000), HostShare("b", tmp_path / "x")]
    specs = NinePSharer().start(shares, tmp_path / "box")
    assert [s.tag for s in specs] == ["a", "b"]
    assert all(s.kind == "9p" and s.socket is None for s in specs)
    assert specs[0].read_only and not specs[1].read_only
    assert (specs[0].uid, specs[0].gid) == (1000, 1000)
    NinePSharer().stop(tmp_path / "box")  # nothing to stop, must not fail


def test_registered_by_core() -> None:
    registry = PluginRegistry(load_entry_points=False)
    sharer = registry.volume_sharer("9p")
    assert isinstance(sharer, NinePSharer)
    assert sharer.capability is Capability.NINEP and sharer.guest_fstype == "9p"
