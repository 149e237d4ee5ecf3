"""Choosing a box's backend probes backends only as the choice needs them (LazyProbes):
the default order stops at the first usable one; a hook that reads every probe gets them all.
"""

from __future__ import annotations

from collections.abc import Mapping

from boxlite_core.hookspecs import hookimpl
from boxlite_core.models import BoxOptions
from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import ProbeResult
from boxlite_testing.runtime_doubles import LaunchFailBackendDouble

PROBED: list[str] = []


def _counting(name: str, available: bool) -> type[LaunchFailBackendDouble]:
    class CountingBackendDouble(LaunchFailBackendDouble):
        def probe(self) -> ProbeResult:
            PROBED.append(name)
            return ProbeResult(available, reason="" if available else f"{name} is absent")

    CountingBackendDouble.name = name
    return CountingBackendDouble


class Backends:
    """Doubles under the built-in order's names: qemu usable, the others not."""

    @hookimpl
    def boxlite_register_vmm_backends(self, register) -> None:
        register("qemu", _counting("qemu", True))
        register("libvirt", _counting("libvirt", True))
        register("libkrun", _counting("libkrun", False))
        register("zz_other", _counting("zz_other", True))


class ReadsEveryProbe:
    @hookimpl
    def boxlite_select_backend(self, options: BoxOptions,
                               probes: Mapping[str, ProbeResult]) -> str | None:
        usable = sorted(name for name, probe in probes.items() if probe.available)
        return usable[-1] if usable else None


def _registry(*plugins: object) -> PluginRegistry:
    PROBED.clear()
    extra = [("backends", Backends()), *((type(p).__name__, p) for p in plugins)]
    return PluginRegistry(load_entry_points=False, extra_plugins=extra)


def test_the_default_choice_probes_only_up_to_the_first_usable_backend() -> None:
    registry = _registry()
    assert registry.select_backend(BoxOptions(image="busybox")) == "qemu"
    assert PROBED == ["qemu"]


def test_a_named_backend_is_not_probed_at_selection() -> None:
    registry = _registry()
    assert registry.select_backend(BoxOptions(image="busybox", backend="libkrun")) == "libkrun"
    assert PROBED == []


def test_a_hook_reading_every_probe_sees_every_backend() -> None:
    registry = _registry(ReadsEveryProbe())
    assert registry.select_backend(BoxOptions(image="busybox")) == "zz_other"
    assert sorted(PROBED) == ["libkrun", "libvirt", "qemu", "zz_other"]


def test_membership_and_listing_probe_nothing() -> None:
    from boxlite_core.plugins import LazyProbes

    probes = LazyProbes(_registry())
    assert "libvirt" in probes and "nope" not in probes
    assert {"qemu", "libvirt", "libkrun", "zz_other"} <= set(probes)
    assert PROBED == []
    assert probes["libkrun"].reason == "libkrun is absent"
    assert PROBED == ["libkrun"]
