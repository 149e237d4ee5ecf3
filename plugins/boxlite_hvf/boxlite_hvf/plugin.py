"""Entry point ``hvf``: registers the backend (and the framework-served virtiofs sharer).

Kept import-light on purpose: the backend class is imported by the factory, so a host
without PyObjC still lists ``hvf`` as a backend that probes unavailable with its reason.
"""

from __future__ import annotations

from typing import Any

from boxlite_core.hookspecs import hookimpl


def _backend() -> Any:
    from .backend import HvfBackend

    return HvfBackend()


def _sharer() -> Any:
    from .sharer import VzVirtiofsSharer

    return VzVirtiofsSharer()


@hookimpl
def boxlite_register_vmm_backends(register: Any) -> None:
    register("hvf", _backend)


@hookimpl
def boxlite_register_volume_sharers(register: Any) -> None:
    register("vz-virtiofs", _sharer)
