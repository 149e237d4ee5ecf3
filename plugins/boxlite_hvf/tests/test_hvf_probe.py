"""probe(): the real answer on this (Linux) host, and the macOS decision table on facts."""

from __future__ import annotations

import platform

import pytest

from boxlite_core.plugins import PluginRegistry
from boxlite_hvf.backend import HvfBackend
from boxlite_hvf.probe import HostFacts, judge

MAC_OK = HostFacts(
    system="Darwin",
    macos_version=(14, 5),
    machine="arm64",
    hv_support=True,
    pyobjc=True,
    python="/opt/py/bin/python3",
    entitled=True,
)


@pytest.mark.skipif(platform.system() != "Linux", reason="checks the Linux answer")
def test_probe_on_linux_is_unavailable_with_reason_and_fix():
    result = HvfBackend().probe()
    assert result.available is False
    assert result.reason == "Hypervisor.framework needs macOS; this host runs Linux"
    assert "pip install boxlite-qemu" in result.fix and "macOS 12+" in result.fix


def test_registered_through_the_entry_point():
    registry = PluginRegistry(allow={"hvf"})
    assert "hvf" in registry.backend_names()
    assert registry.backend_plugin("hvf") == "hvf"
    assert "vz-virtiofs" in registry.sharer_names()
    assert not [f for f in registry.failures if f.plugin == "hvf"]


def test_mac_with_everything_is_available():
    result = judge(MAC_OK)
    assert result.available, result.reason
    assert result.details["arch"] == "arm64"


@pytest.mark.parametrize(
    ("change", "reason", "fix"),
    [
        ({"macos_version": (12, 2)}, "12.3", "update macOS"),
        ({"machine": "ppc"}, "architecture", "Apple silicon"),
        ({"hv_support": False}, "kern.hv_support", "nested"),
        ({"pyobjc": False}, "PyObjC", "pyobjc-framework-Virtualization"),
        ({"entitled": False}, "com.apple.security.virtualization", "codesign"),
    ],
)
def test_mac_shortfalls_say_why_and_how_to_fix(change, reason, fix):
    import attrs

    result = judge(attrs.evolve(MAC_OK, **change))
    assert not result.available
    assert reason in result.reason
    assert fix in result.fix


def test_unknown_entitlement_state_does_not_block():
    import attrs

    assert judge(attrs.evolve(MAC_OK, entitled=None)).available


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the non-macOS failure")
def test_real_framework_layer_fails_clearly_without_pyobjc():
    from boxlite_core.errors import EngineError
    from boxlite_hvf.framework import PyObjCVz

    with pytest.raises(EngineError, match="pyobjc-framework-Virtualization"):
        PyObjCVz()
