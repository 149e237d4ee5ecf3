"""The distribution wiring: entry point → backend "qemu", and probe on this host."""

from __future__ import annotations

from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import Capability
from boxlite_qemu.backend import QemuBackend


def test_entry_point_registers_qemu() -> None:
    registry = PluginRegistry(allow={"qemu"})
    assert "qemu" in registry.backend_names()
    assert registry.backend_plugin("qemu") == "qemu"
    assert isinstance(registry.backend("qemu"), QemuBackend)
    assert not [f for f in registry.failures if f.plugin == "qemu"]


def test_probe_and_capabilities_here() -> None:
    backend = QemuBackend()
    probe = backend.probe()
    caps = backend.capabilities()
    assert {Capability.NINEP, Capability.QCOW2, Capability.RAW, Capability.VIRTIO_SERIAL,
            Capability.PAUSE, Capability.ATTACH, Capability.TCG} <= caps
    if not probe.available:
        assert probe.reason and probe.fix
        return
    details = probe.details
    assert details["accel"] in ("kvm", "tcg", "hvf")
    assert (Capability.KVM in caps) == (details["accel"] == "kvm")
    assert (Capability.VIRTIOFS in caps) == bool(details["virtiofsd"])
    if details["accel"] == "tcg" and not details["accel_reason"].startswith("forced"):
        assert details["accel_notice"].startswith("boxlite: using QEMU TCG")
    assert details["qemu_version"]


def test_probe_without_qemu_is_unavailable(monkeypatch) -> None:
    from boxlite_core import tools

    real = tools.find_tool
    monkeypatch.setattr(
        tools, "find_tool", lambda name: None if name.startswith("qemu-system") else real(name)
    )
    probe = QemuBackend().probe()
    assert not probe.available
    assert "not found" in probe.reason
    assert probe.fix.startswith("apt-get install qemu-system")
