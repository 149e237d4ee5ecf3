"""Booted boxes shared between tests, because a boot costs seconds (TCG: ~6 s).

The pool is lazy: nothing is imported or booted until a test that passed its capability gate
asks for a box, so a run where every VM test is skipped never touches the runtime. A box that
failed to start is remembered, and every test asking for it gets the same error at once
instead of booting again.

For a backend declaring ``snapshot`` the core starts boxes from boot templates (a cold start
saves one; later starts of the same VM layout restore it), so the shared default box, the one
T1 runs on, is made template-restored (:meth:`BoxPool.default_box`): T1 then proves that a
restored box behaves as a booted one, and T3 ``TestTemplateRestoredBox`` checks that it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def boot_record(box: Any) -> dict[str, Any]:
    """Where the box's last start got its VM: ``{"source": "kernel"|"template"|"snapshot",
    "template": layout key or None, "reason": why no template was used, or None}``
    (``inspect``: ``state.boot``); ``{}`` from a runtime that does not record it."""
    boot = box.record.state.get("boot")
    return dict(boot) if isinstance(boot, Mapping) else {}


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
        #: snapshots the tests took, removed at session end after the boxes on their disks
        self._snapshots: list[str] = []

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

    def fresh(self, *, start: bool = True, restored: bool = False, **overrides: Any) -> Any:
        """A box of one's own (for tests that stop, kill or restart it).

        ``restored``: when its start booted the kernel and saved a boot template (the home
        had none for this layout), replace it with a box of the same options, which restores
        that template: one restore (~1 s under TCG) more, once per layout and home.
        """
        box = self.runtime.create(self.options(**overrides))
        self._owned.append(box)
        if start:
            box.start()
            if restored and self._saved_a_template(box):
                self.discard(box)
                return self.fresh(**overrides)
        return box

    def _saved_a_template(self, box: Any) -> bool:
        """Whether ``box`` booted the kernel and a template for its layout now exists (its
        start saved one). False for a backend without templates (no layout key) or with
        templates off: its ``state["boot"]["reason"]`` says why."""
        boot = boot_record(box)
        key = boot.get("template")
        if boot.get("source") != "kernel" or not key:
            return False
        try:
            return self.runtime.templates().find(str(key)) is not None
        except Exception:  # a broken template: the next start boots cold and says why
            return False

    def adopt(self, box: Any) -> Any:
        """Own a box made elsewhere (``fork()`` copies): removed at session end."""
        self._owned.append(box)
        return box

    def discard(self, box: Any) -> None:
        """Remove an owned box now (best effort): idle VMs slow every later boot."""
        try:
            box.remove(force=True)
        except Exception:
            pass
        self._owned = [b for b in self._owned if b is not box]

    def snapshot(self, box: Any, name: str) -> Any:
        """``box.snapshot(name)``, removed at session end (after the boxes on its disks)."""
        snap = box.snapshot(name)
        self._snapshots.append(name)
        return snap

    def remove_snapshot(self, name: str) -> None:
        """Remove a snapshot :meth:`snapshot` took (best effort: a box still on its disks
        keeps it until session end)."""
        try:
            self.runtime.remove_snapshot(name)
        except Exception:
            return
        self._snapshots = [n for n in self._snapshots if n != name]

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
        """The shared box most tests use; its settings are what TestGuestResources checks.
        Template-restored where the backend makes templates (see the module docs)."""
        return self.shared(
            "default", cpus=default_cpus(), memory_mib=DEFAULT_MEMORY_MIB, rootfs=rootfs,
            restored=True,
        )

    def close(self) -> None:
        for box in reversed(self._owned):
            try:
                box.remove(force=True)
            except Exception:
                pass
        self._owned.clear()
        self._shared.clear()
        for name in list(self._snapshots):
            self.remove_snapshot(name)
        if self._runtime is not None:
            close = getattr(self._runtime, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            self._runtime = None
