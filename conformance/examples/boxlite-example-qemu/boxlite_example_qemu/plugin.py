"""The plugin module the ``boxlite`` entry point names: one hook, one register call."""

from __future__ import annotations

from boxlite_core.vendor import RegisterFn, VmmBackend, hookimpl


@hookimpl
def boxlite_register_vmm_backends(register: RegisterFn) -> None:
    # Import inside the factory: `boxlite backends` stays fast and a broken import makes
    # this backend fail on its own, not the whole plugin scan.
    def factory() -> VmmBackend:
        from .backend import ExampleQemuBackend

        return ExampleQemuBackend()

    register("example-qemu", factory)
