"""The core's own plugin: built-in rootfs strategies, volume sharers, default backend choice.

Registered through the same entry-point group as any vendor plugin (see pyproject.toml), so
the built-ins get no private path into the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .hookspecs import hookimpl
from .models import BoxOptions
from .vmm.spec import ProbeResult

if TYPE_CHECKING:
    from .rootfs.base import RootfsStrategy
    from .volumes.base import VolumeSharer

#: preference order for the default backend choice
DEFAULT_BACKEND_ORDER = ("qemu", "libvirt", "libkrun", "hvf")


@hookimpl
def boxlite_register_rootfs_strategies(
    register: Callable[[str, Callable[[], RootfsStrategy]], None],
) -> None:
    from .rootfs.disk import DiskStrategy
    from .rootfs.layers import LayersStrategy
    from .rootfs.merged import MergedStrategy

    register("disk", DiskStrategy)
    register("merged", MergedStrategy)
    register("layers", LayersStrategy)


@hookimpl
def boxlite_register_volume_sharers(
    register: Callable[[str, Callable[[], VolumeSharer]], None],
) -> None:
    from .volumes.ninep import NinePSharer
    from .volumes.virtiofs import VirtiofsSharer

    register("virtiofs", VirtiofsSharer)
    register("9p", NinePSharer)


@hookimpl(trylast=True)
def boxlite_select_backend(options: BoxOptions, probes: Mapping[str, ProbeResult]) -> str | None:
    for name in DEFAULT_BACKEND_ORDER:
        if name in probes and probes[name].available:
            return name
    for name, probe in sorted(probes.items()):
        if probe.available:
            return name
    return None
