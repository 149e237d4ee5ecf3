"""The boxlite plugin contract: every hook a plugin may implement, in one place.

Read this file as the vendor's manual. A plugin is a module (or object) registered under the
``boxlite`` entry-point group::

    [project.entry-points.boxlite]
    mybackend = "mypkg.plugin"

whose module defines functions decorated with :data:`hookimpl`. Registration hooks pass a
``register`` callback: the plugin calls it and never reaches into the core's state. The core's
own rootfs strategies and volume sharers are registered through these same hooks
(``boxlite_core.builtin_plugin``), so a vendor's strategy is a peer, not a patch.

Set ``BOXLITE_PLUGINS=name1,name2`` to load only those entry points (the ``core`` plugin always
loads). A plugin that fails to import or raises in a hook is reported by name
(``boxlite backends``) and the others keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeAlias

import pluggy

if TYPE_CHECKING:
    from .models import BoxOptions, JsonValue
    from .rootfs.base import RootfsStrategy
    from .vmm.base import VmmBackend
    from .vmm.spec import ProbeResult
    from .volumes.base import VolumeSharer

PROJECT = "boxlite"
ENTRY_POINT_GROUP = "boxlite"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: ``register(name, factory)``; the factory is called with no arguments when first needed and
#: must return a :class:`~boxlite_core.vmm.base.VmmBackend`. (A string alias: the hooks module
#: stays import-light; the names resolve for type checkers.)
RegisterFn: TypeAlias = "Callable[[str, Callable[[], VmmBackend]], None]"


@hookspec
def boxlite_register_vmm_backends(register: RegisterFn) -> None:
    """Register VMM backends.

    Called once per runtime. Call ``register("name", factory)`` for each backend, where
    ``factory()`` returns a :class:`~boxlite_core.vmm.base.VmmBackend`. Keep import-time work
    small: heavy imports (libvirt, cffi libraries) belong in the factory or in ``probe()``, so
    a missing library makes the backend *unavailable* rather than the plugin broken.
    Registering a name twice is an error reported against the second plugin.

    Raises:
        PluginError: from ``register`` for an empty name or one already registered. Any
            exception escaping this hook is recorded against this plugin (``boxlite
            backends`` lists it); the other plugins' backends still load.
    """


@hookspec
def boxlite_register_rootfs_strategies(
    register: Callable[[str, Callable[[], RootfsStrategy]], None],
) -> None:
    """Register rootfs strategies (``disk``, ``merged``, ``layers`` are the core's).

    ``factory()`` returns a :class:`~boxlite_core.rootfs.base.RootfsStrategy`.

    Raises:
        PluginError: as for :func:`boxlite_register_vmm_backends` (isolated the same way).
    """


@hookspec
def boxlite_register_volume_sharers(
    register: Callable[[str, Callable[[], VolumeSharer]], None],
) -> None:
    """Register volume sharers (``virtiofs``, ``9p`` are the core's).

    ``factory()`` returns a :class:`~boxlite_core.volumes.base.VolumeSharer`.

    Raises:
        PluginError: as for :func:`boxlite_register_vmm_backends` (isolated the same way).
    """


@hookspec(firstresult=True)
def boxlite_select_backend(
    options: BoxOptions, probes: Mapping[str, ProbeResult]
) -> str | None:
    """Pick the backend for a box whose options name none.

    ``probes`` maps every registered backend name to its probe result. Return a name to
    decide, or None to let the next plugin decide. The core's default runs last
    (``trylast``): the first available of qemu, libvirt, libkrun, hvf, then any other.

    Raises:
        Nothing on purpose: this hook is not isolated, so an exception fails the user's
        command. A name that is not registered fails later with NotFoundError; when no
        plugin decides, the core raises ConfigError listing every backend's probe reason.
    """


@hookspec
def boxlite_box_created(box: Mapping[str, JsonValue]) -> None:
    """A box record was created (``box`` is the record as a dict). For audit/metrics plugins.

    Raises:
        Nothing that matters: an exception in any lifecycle hook is logged, recorded against
        the plugin, and never stops the box.
    """


@hookspec
def boxlite_box_started(box: Mapping[str, JsonValue], stage_timings: Mapping[str, float]) -> None:
    """A box's VM is up and its agent initialised. ``stage_timings``: seconds per init stage.

    Raises:
        Nothing that matters: as :func:`boxlite_box_created` (logged, never stops the box).
    """


@hookspec
def boxlite_box_stopped(box: Mapping[str, JsonValue], reason: str) -> None:
    """A box stopped (asked, or its VM went away: ``reason`` says which).

    Raises:
        Nothing that matters: as :func:`boxlite_box_created` (logged, never stops the box).
    """


@hookspec
def boxlite_box_failed(box: Mapping[str, JsonValue], error: str, stage: str | None) -> None:
    """A box start failed in ``stage``; the record is kept as Failed with ``error``.

    Raises:
        Nothing that matters: as :func:`boxlite_box_created` (logged, never stops the box).
    """
