"""boxlite: run untrusted code in micro-VMs, with a pluggable VMM layer.

Three lines::

    from boxlite_core import Runtime, BoxOptions
    with Runtime() as rt, rt.create(BoxOptions(image="busybox")) as box:
        print(box.exec(["echo", "hello"]).text)

Attributes are imported lazily so that light users (the CLI's ``--help``, plugins that only
need the hook markers) do not pay for gRPC and sqlite at import time.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Runtime": "boxlite_core.runtime.runtime",
    "AsyncRuntime": "boxlite_core.runtime.aio",
    "Box": "boxlite_core.runtime.box",
    "Snapshot": "boxlite_core.runtime.snapshots",
    "Terminal": "boxlite_core.runtime.terminal",
    "BoxOptions": "boxlite_core.models",
    "VolumeSpec": "boxlite_core.models",
    "ExecResult": "boxlite_core.models",
    "BoxStatus": "boxlite_core.models",
    "Capability": "boxlite_core.vmm.spec",
    "hookimpl": "boxlite_core.hookspecs",
    "BoxliteError": "boxlite_core.errors",
    "ConfigError": "boxlite_core.errors",
    "ImageError": "boxlite_core.errors",
    "EngineError": "boxlite_core.errors",
    "GuestError": "boxlite_core.errors",
    "NotFoundError": "boxlite_core.errors",
    "StateError": "boxlite_core.errors",
    "UnsupportedError": "boxlite_core.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'boxlite_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
