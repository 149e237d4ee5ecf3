"""Plugin discovery through real entry points: throwaway distributions on PYTHONPATH."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import pytest

from boxlite_testing.cli import boxlite

GOOD = textwrap.dedent("""
    from boxlite_core.hookspecs import hookimpl
    from boxlite_core.vmm.spec import Capability, ProbeResult
    from boxlite_core.vmm.base import LaunchPlan, VmmBackend


    class EchoBackendDouble(VmmBackend):
        name = "echo_double"

        def capabilities(self):
            return frozenset({Capability.NINEP, Capability.TCG})

        def probe(self):
            return ProbeResult(False, reason="echo_double never boots", fix="none needed")

        def plan(self, spec):
            return LaunchPlan(self.name, spec, {})

        def launch(self, plan):
            raise RuntimeError("echo_double")

        def attach(self, box_dir):
            return None


    @hookimpl
    def boxlite_register_vmm_backends(register):
        register("echo_double", EchoBackendDouble)
""")

BROKEN = "raise ImportError('broken_double is broken on purpose')\n"


def _dist(site: Path, dist: str, module: str, source: str) -> None:
    """Install a distribution the way pip leaves it: module + .dist-info with entry points."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[boxlite]\n{module} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _dist(site, "boxlite_echo_double", "echo_double", GOOD)
    _dist(site, "boxlite_broken_double", "broken_double", BROKEN)
    return site


def _backends(site: Path, tmp_path: Path, **env: str) -> dict:
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    proc = boxlite(
        "backends", "--json", env={"PYTHONPATH": pythonpath, **env}, home=tmp_path / "home"
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_installed_distribution_backend_appears(site, tmp_path):
    data = _backends(site, tmp_path)
    echo = {b["name"]: b for b in data["backends"]}["echo_double"]
    assert echo["plugin"] == "echo_double"
    assert echo["available"] is False and echo["reason"] == "echo_double never boots"
    assert set(echo["capabilities"]) == {"9p", "tcg"}


def test_broken_plugin_is_named_and_others_work(site, tmp_path):
    data = _backends(site, tmp_path)
    broken = [f for f in data["failures"] if f["plugin"] == "broken_double"]
    assert broken and broken[0]["where"] == "import"
    assert "broken on purpose" in broken[0]["error"]
    assert "echo_double" in {b["name"] for b in data["backends"]}


def test_allowlist_excludes_plugins(site, tmp_path):
    data = _backends(site, tmp_path, BOXLITE_PLUGINS="core,echo_double")
    assert not [f for f in data["failures"] if f["plugin"] == "broken_double"]
    assert "echo_double" in {b["name"] for b in data["backends"]}
    data = _backends(site, tmp_path, BOXLITE_PLUGINS="core")
    assert "echo_double" not in {b["name"] for b in data["backends"]}
    assert not [f for f in data["failures"] if f["plugin"] == "broken_double"]


@pytest.mark.skipif(
    importlib.util.find_spec("boxlite_qemu") is None, reason="boxlite-qemu is not installed"
)
def test_qemu_backend_listed_when_installed(tmp_path):
    proc = boxlite("backends", "--json", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "qemu" in {b["name"] for b in json.loads(proc.stdout)["backends"]}
