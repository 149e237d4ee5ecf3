"""probe() and attach() without a usable daemon: unavailable, with the reason and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_qemu.libvirt_backend import LibvirtBackend, LibvirtHandle

BAD_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def test_probe_with_no_daemon_is_unavailable_with_fix(monkeypatch) -> None:
    pytest.importorskip("libvirt")
    monkeypatch.setenv("BOXLITE_LIBVIRT_URI", BAD_URI)
    result = LibvirtBackend().probe()
    assert not result.available
    assert BAD_URI in result.reason
    assert "libvirtd -d" in result.fix
    assert "apt-get install libvirt-daemon-system" in result.fix
    assert result.details["uri"] == BAD_URI


def test_handle_on_unreachable_daemon_raises_engine_error() -> None:
    pytest.importorskip("libvirt")
    handle = LibvirtHandle(BAD_URI, "boxlite-x", "00000000-0000-0000-0000-000000000000", 1, None)
    with pytest.raises(EngineError, match="libvirtd"):
        handle.is_running()


def test_probe_without_libvirt_python_double(tmp_path: Path) -> None:
    """libvirt-python hidden (sys.modules entry None): the module still imports, the backend
    is unavailable with the pip fix, and the registry lists it without a plugin failure."""
    code = (
        "import sys, json; sys.modules['libvirt'] = None\n"
        "from boxlite_qemu.libvirt_backend import LibvirtBackend\n"
        "from boxlite_core.plugins import PluginRegistry\n"
        "r = PluginRegistry()\n"
        "p = r.probe_all()['libvirt']\n"
        "print(json.dumps({'probe': p.to_dict(), 'failures': [f.to_dict() for f in "
        "r.failures if f.plugin == 'qemu']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["failures"] == []
    assert data["probe"]["available"] is False
    assert "libvirt-python" in data["probe"]["reason"]
    assert "boxlite-qemu[libvirt]" in data["probe"]["fix"]


def test_attach_without_record_is_none(tmp_path: Path) -> None:
    assert LibvirtBackend(BAD_URI, domain_type="qemu").attach(tmp_path) is None
    (tmp_path / "vm.json").write_text(json.dumps({"backend": "qemu", "pid": 1}))
    assert LibvirtBackend(BAD_URI, domain_type="qemu").attach(tmp_path) is None
