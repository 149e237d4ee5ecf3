"""Booted boxes shared between tests, because a boot costs seconds (TCG: ~6 s).

The pool is lazy: nothing is imported or booted until a test that passed its capability gate
asks for a box, so a run where every VM test is skipped never touches the runtime. A box that
failed to start is remembered, and every test asking for it gets the same error at once
instead of booting again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path("/var/tmp/boxlite-test-home")
ENV_HOME = "BOXLITE_TEST_HOME"
IMAGE = "busybox"
#: memory of the shared box: not a common default, so a backend ignoring it is caught
DEFAULT_MEMORY_MIB = 384


def default_cpus() -> int:
    """2 where the host has 2, so a backend that ignores cpus (and boots 1) is caught."""
    return min(2, os.cpu_count() or 1)


def conformance_home() -> Path:
    """The runtime home for VM tiers: caches (guest kit, images) are reused across runs."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME)


def import_runtime() -> tuple[Any, Any]:
    """(Runtime, BoxOptions), or ImportError when the runtime is not installed/finished."""
    from boxlite_core import BoxOptions, Runtime

    return Runtime, BoxOptions


class BoxPool:
    """Boxes for one backend, keyed by what makes them different; removed at session end."""

    def __init__(self, backend_name: str, home: Path, registry: Any = None) -> None:
        self.backend_name = backend_name
        self.home = home
        #: the PluginRegistry the backend came from; boxes must be made through the same one,
        #: or a backend a vendor adds in ``boxlite_registry`` would pass T0 and vanish at T1
        self.registry = registry
        self._runtime: Any = None
        self._shared: dict[str, Any] = {}
        self._owned: list[Any] = []
        self._data: dict[str, Any] = {}

    @property
    def runtime(self) -> Any:
        if self._runtime is None:
            runtime_cls, _ = import_runtime()
            self.home.mkdir(parents=True, exist_ok=True)
            self._runtime = runtime_cls(home=self.home, plugins=self.registry)
        return self._runtime

    def options(self, **overrides: Any) -> Any:
        _, options_cls = import_runtime()
        values: dict[str, Any] = {"image": IMAGE, "backend": self.backend_name}
        values.update(overrides)
        return options_cls(**values)

    def fresh(self, *, start: bool = True, **overrides: Any) -> Any:
        """A box of one's own (for tests that stop, kill or restart it)."""
        box = self.runtime.create(self.options(**overrides))
        self._owned.append(box)
        if start:
            box.start()
        return box

    def shared(self, key: str, **overrides: Any) -> Any:
        """The one started box for ``key``; tests using it must not change its state.

        Besides the default box, at most one shared box runs at a time: on a small CI host
        under TCG, idle VMs left running slow every later boot (tests are ordered so that
        each configuration's tests are contiguous, see the plugin).
        """
        entry = self._shared.get(key)
        if entry is None and key != "default":
            self._retire_others(keep=key)
        if entry is None:
            try:
                entry = self.fresh(**overrides)
            except Exception as exc:  # remembered: later tests fail fast with the same cause
                entry = exc
            self._shared[key] = entry
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def _retire_others(self, keep: str) -> None:
        for other, box in list(self._shared.items()):
            if other in ("default", keep) or isinstance(box, BaseException):
                continue
            try:
                box.remove(force=True)
            except Exception:
                pass
            self._owned = [b for b in self._owned if b is not box]
            del self._shared[other]

    def remember(self, key: str, make: Any) -> Any:
        """``make()`` once per session for ``key`` (host dirs a shared box was created with)."""
        if key not in self._data:
            self._data[key] = make()
        return self._data[key]

    def default_box(self, rootfs: str) -> Any:
        """The shared box most tests use; its settings are what TestGuestResources checks."""
        return self.shared(
            "default", cpus=default_cpus(), memory_mib=DEFAULT_MEMORY_MIB, rootfs=rootfs
        )

    def close(self) -> None:
        for box in reversed(self._owned):
            try:
                box.remove(force=True)
            except Exception:
                pass
        self._owned.clear()
        self._shared.clear()
        if self._runtime is not None:
            close = getattr(self._runtime, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            self._runtime = None
