"""The plugin module the ``boxlite`` entry point names: one hook, one register call."""

from __future__ import annotations

from typing import Any

from boxlite_core.hookspecs import hookimpl


@hookimpl
def boxlite_register_vmm_backends(register: Any) -> None:
    # Import inside the factory: `boxlite backends` stays fast and a broken import makes
    # this backend fail on its own, not the whole plugin scan.
    def factory() -> Any:
        from .backend import ExampleBackend

        return ExampleBackend()

    register("example", factory)
