"""Finding and calling plugins: entry points, the allowlist, and failure isolation.

Why not ``pm.load_setuptools_entrypoints``: it stops at the first broken plugin. Here every
entry point loads on its own, and each hook implementation is called on its own, so one broken
plugin is reported by name and the rest keep working (``boxlite backends`` shows the failures).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import TypeVar, cast

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError, NotFoundError, PluginError, UnsupportedError
from .models import BoxOptions
from .rootfs.base import RootfsStrategy
from .vmm.base import VmmBackend
from .vmm.spec import ProbeResult
from .volumes.base import VolumeSharer

log = logging.getLogger(__name__)

T = TypeVar("T")
ALWAYS_LOADED = frozenset({"core"})
ENV_ALLOWLIST = "BOXLITE_PLUGINS"
#: seconds a backend's probe result is reused. Why cache at all: one ``boxlite run`` asks
#: twice (create picks a backend from every probe, then start checks the chosen one) and a
#: probe may spawn tools (``qemu-system-* --version``, a libvirt connection). Why not for
#: ever: a long-lived program should notice a host change (KVM loaded, libvirtd started).
PROBE_TTL = 30.0


@attrs.frozen
class PluginFailure:
    """A plugin that could not load or broke in a hook."""

    plugin: str
    where: str  # "import", or the hook's name
    error: str

    def to_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


@attrs.define
class _Registered:
    plugin: str
    factory: Callable[[], object]  # checked against the kind's base class on first use
    instance: object | None = None


def allowlist_from_env(env: Mapping[str, str] | None = None) -> frozenset[str] | None:
    raw = (env if env is not None else os.environ).get(ENV_ALLOWLIST, "").strip()
    if not raw:
        return None
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


class LazyProbes(Mapping[str, ProbeResult]):
    """Every backend's probe, run when first looked up (``in`` and ``keys()`` probe nothing).

    Why: choosing a backend asks for the first usable one in an order; probing all of them
    first cost every CLI start ~0.05 s (libvirt's import, libkrun's library search, ...).
    A ``boxlite_select_backend`` hook that reads every value still probes every backend."""

    def __init__(self, registry: PluginRegistry) -> None:
        self._registry = registry
        self._names = registry.backend_names()

    def __getitem__(self, name: str) -> ProbeResult:
        if name not in self._names:
            raise KeyError(name)
        return self._registry.probe(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class PluginRegistry:
    """The loaded plugins and everything they registered."""

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        allow: Iterable[str] | None = None,
        extra_plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._allow = frozenset(allow) if allow is not None else allowlist_from_env()
        self._backends: dict[str, _Registered] = {}
        self._strategies: dict[str, _Registered] = {}
        self._sharers: dict[str, _Registered] = {}
        self._probes: dict[tuple[str, str], tuple[float, ProbeResult]] = {}
        self._probe_lock = threading.Lock()
        #: (backend name, host) -> the backend's instance for that host (VmmBackend.for_host)
        self._hosted: dict[tuple[str, str], VmmBackend] = {}
        self._hosted_lock = threading.Lock()
        if load_entry_points:
            self._load_entry_points()
        else:
            from . import builtin_plugin

            self._register_plugin("core", builtin_plugin)
        for name, plugin in extra_plugins:
            self._register_plugin(name, plugin)
        self._collect()

    # -- loading ---------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        seen: set[str] = set()
        for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            if self._allow is not None and ep.name not in self._allow | ALWAYS_LOADED:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the core down
                self._fail(ep.name, "import", exc)
                continue
            self._register_plugin(ep.name, plugin)
        if "core" not in seen:  # running from a source tree without the package installed
            from . import builtin_plugin

            self._register_plugin("core", builtin_plugin)

    def _register_plugin(self, name: str, plugin: object) -> None:
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            self._fail(name, "register", exc)
            try:
                self.pm.unregister(plugin)
            except Exception:
                pass

    def _fail(self, plugin: str, where: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("boxlite plugin %r failed in %s: %s", plugin, where, message)
        self.failures.append(PluginFailure(plugin, where, message))

    def _call_each(self, hook_name: str, **kwargs: object) -> list[tuple[str, object]]:
        """Call every implementation of a hook separately, recording failures by plugin."""
        hook = getattr(self.pm.hook, hook_name)
        results = []
        for impl in reversed(hook.get_hookimpls()):  # registration order
            try:
                results.append((impl.plugin_name, impl.function(**kwargs)))
            except Exception as exc:
                self._fail(impl.plugin_name, hook_name, exc)
        return results

    def _collect(self) -> None:
        for hook_name, table in (
            ("boxlite_register_vmm_backends", self._backends),
            ("boxlite_register_rootfs_strategies", self._strategies),
            ("boxlite_register_volume_sharers", self._sharers),
        ):
            hook = getattr(self.pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):
                plugin = impl.plugin_name

                def register(
                    name: str, factory: Callable[[], object], _p: str = plugin,
                    _t: dict[str, _Registered] = table
                ) -> None:
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"plugin {_p!r} registered an empty name")
                    if name in _t:
                        raise PluginError(
                            f"plugin {_p!r} registers {name!r}, already registered by "
                            f"plugin {_t[name].plugin!r}"
                        )
                    _t[name] = _Registered(_p, factory)

                try:
                    impl.function(register=register)
                except Exception as exc:
                    self._fail(plugin, hook_name, exc)

    # -- lookups ---------------------------------------------------------------------------

    @staticmethod
    def _instance(table: dict[str, _Registered], name: str, kind: str, base: type[T]) -> T:
        entry = table.get(name)
        if entry is None:
            known = ", ".join(sorted(table)) or "none"
            raise NotFoundError(f"no {kind} named {name!r} (registered: {known})")
        if entry.instance is None:
            obj = entry.factory()
            if not isinstance(obj, base):
                raise PluginError(
                    f"plugin {entry.plugin!r}: {kind} {name!r} factory returned "
                    f"{type(obj).__name__}, not a {base.__name__}"
                )
            entry.instance = obj
        return cast(T, entry.instance)  # checked isinstance(base) when it was made

    def backend_names(self) -> list[str]:
        return sorted(self._backends)

    def backend_plugin(self, name: str) -> str:
        return self._backends[name].plugin

    def backend(self, name: str, host: str | None = None) -> VmmBackend:
        """Backend ``name``; with ``host``, its instance for that machine (made once per
        process by ``VmmBackend.for_host``; the default instance when it already runs boxes
        there).

        Raises:
            NotFoundError: no backend ``name``.
            UnsupportedError: the backend runs boxes on this machine only.
            ConfigError: the backend cannot reach ``host`` as written.
            PluginError: its ``for_host`` returned something else than a VmmBackend.
        """
        base = self._instance(self._backends, name, "VMM backend", VmmBackend)
        if not host or host == base.remote_host:
            return base
        with self._hosted_lock:
            made = self._hosted.get((name, host))
            if made is None:
                made = base.for_host(host)
                if not isinstance(made, VmmBackend):
                    raise PluginError(
                        f"plugin {self._backends[name].plugin!r}: backend {name!r} for_host "
                        f"returned {type(made).__name__}, not a VmmBackend")
                self._hosted[(name, host)] = made
            return made

    def strategy_names(self) -> list[str]:
        return sorted(self._strategies)

    def rootfs_strategy(self, name: str) -> RootfsStrategy:
        return self._instance(self._strategies, name, "rootfs strategy", RootfsStrategy)

    def sharer_names(self) -> list[str]:
        return sorted(self._sharers)

    def volume_sharer(self, name: str) -> VolumeSharer:
        return self._instance(self._sharers, name, "volume sharer", VolumeSharer)

    def probe(self, name: str, host: str | None = None) -> ProbeResult:
        """Backend ``name``'s probe, reused for :data:`PROBE_TTL` seconds; a backend whose
        factory or probe raises is unavailable (the result says so and names its plugin).

        Raises NotFoundError: no backend ``name``."""
        if name not in self._backends:
            self.backend(name)  # raises NotFoundError with the known names
        with self._probe_lock:  # concurrent starts probe once, not once each
            cached = self._probes.get((name, host or ""))
            if cached is not None and time.monotonic() - cached[0] < PROBE_TTL:
                return cached[1]
            try:
                result = self.backend(name, host).probe()
            except (UnsupportedError, ConfigError) as exc:  # for_host: not there, or not so
                result = ProbeResult(False, reason=str(exc),
                                     fix=f"check --host {host!r}, or pick another --backend")
            except Exception as exc:
                result = ProbeResult(
                    False,
                    reason=f"backend raised while probing: {type(exc).__name__}: {exc}",
                    fix=f"report this to the maker of plugin {self._backends[name].plugin!r}",
                )
            self._probes[(name, host or "")] = (time.monotonic(), result)
            return result

    def probe_all(self) -> dict[str, ProbeResult]:
        """Probe every backend (see :meth:`probe`: results are reused for a short while)."""
        return {name: self.probe(name) for name in self.backend_names()}

    def select_backend(self, options: BoxOptions) -> str:
        """The backend a box gets: the one named in options, else (with ``options.host``)
        the first whose instance for that host probes available, else the hook's choice."""
        if options.backend:
            self.backend(options.backend)  # raises NotFoundError with the known names
            return options.backend
        if options.host:  # the first backend that runs boxes there
            reasons = []
            for name in self.backend_names():
                result = self.probe(name, options.host)
                if result.available:
                    return name
                reasons.append(f"{name}: {result.reason}")
            raise ConfigError(f"no backend can run boxes on host {options.host!r} "
                              f"({'; '.join(reasons) or 'none registered'})")
        probes = LazyProbes(self)
        choice = self.pm.hook.boxlite_select_backend(options=options, probes=probes)
        if not choice:
            reasons = "; ".join(f"{n}: {p.reason}" for n, p in probes.items()) or "none registered"
            raise ConfigError(
                f"no usable VMM backend ({reasons}); install one, e.g. pip install boxlite-qemu"
            )
        return choice

    def notify(self, event: str, **kwargs: object) -> None:
        """Fire a lifecycle hook; a failing listener is logged and never stops the box."""
        self._call_each(f"boxlite_box_{event}", **kwargs)
