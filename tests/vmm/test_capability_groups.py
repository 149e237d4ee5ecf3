"""Every capability a backend declares belongs to exactly one documented group."""

from __future__ import annotations

from boxlite_core.vmm.spec import Capability, CapabilityGroup


def test_every_capability_has_a_group() -> None:
    assert {c.group for c in Capability} == set(CapabilityGroup)


def test_the_groups_are_the_contracts() -> None:
    by_group = {g: {c.value for c in Capability if c.group is g} for g in CapabilityGroup}
    assert by_group == {
        CapabilityGroup.DEVICES: {"9p", "virtiofs", "qcow2", "raw", "virtio-serial", "vsock"},
        CapabilityGroup.OPERATIONS: {"pause", "snapshot", "attach", "network"},
        CapabilityGroup.ACCELERATION: {"kvm", "tcg", "hvf"},
    }


def test_the_docstring_names_every_capability() -> None:
    doc = Capability.__doc__ or ""
    for group in CapabilityGroup:
        assert group.value in doc
    for cap in Capability:
        assert f"``{cap.value}``" in doc, cap
