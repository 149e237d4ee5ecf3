"""Entry point ``boxlite: qemu``: registers the QEMU backend with the core.

Import-light on purpose: the backend module (and qemu.qmp) loads only when the factory runs.
"""

from __future__ import annotations

from typing import Any

from boxlite_core.hookspecs import hookimpl


def _factory() -> Any:
    from .backend import QemuBackend

    return QemuBackend()


def _libvirt_factory() -> Any:
    # libvirt_backend imports without libvirt-python; `import libvirt` happens in its methods
    from .libvirt_backend import LibvirtBackend

    return LibvirtBackend()


@hookimpl
def boxlite_register_vmm_backends(register: Any) -> None:
    register("qemu", _factory)
    register("libvirt", _libvirt_factory)
