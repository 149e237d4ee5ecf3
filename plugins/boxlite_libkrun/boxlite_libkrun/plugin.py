"""Entry point ``boxlite.libkrun``: registers the libkrun VMM backend.

Import stays cheap: cffi and the library load only when the backend probes or launches, so a
host without libkrun sees the backend *unavailable* (with the fix), never a broken plugin.
"""

from __future__ import annotations

from typing import Any

from boxlite_core.hookspecs import hookimpl


@hookimpl
def boxlite_register_vmm_backends(register: Any) -> None:
    from .backend import LibkrunBackend

    register("libkrun", LibkrunBackend)
