"""A libvirt refusal during pause/resume reaches the caller as EngineError naming the domain,
not as a libvirt-python exception the runtime and CLI do not know."""

from __future__ import annotations

import pytest

from boxlite_core.errors import EngineError

libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed: "
                              "pip install 'boxlite-qemu[libvirt]'")


def test_a_refused_control_call_is_an_engine_error() -> None:
    from boxlite_qemu.libvirt_backend import LibvirtHandle

    handle = LibvirtHandle("qemu:///system", "boxlite-b0x1d", "uuid", 1, None)

    def refuse() -> None:
        raise libvirt.libvirtError("Requested operation is not valid: domain is not running")

    with pytest.raises(EngineError, match="libvirt domain boxlite-b0x1d: virDomainSuspend "
                       "failed: Requested operation is not valid"):
        handle._control("virDomainSuspend", refuse)
