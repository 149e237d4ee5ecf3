"""The pytest plugin behind the suite: options, fixtures, capability gates, the report.

Load it with one conftest line, ``pytest_plugins = ["boxlite_conformance.plugin"]``. Fixtures a
vendor may override (like fsspec's ``fs``):

* ``backend_name`` — the registry name under test (default: ``--boxlite-backend`` or
  ``$BOXLITE_CONFORMANCE_BACKEND``);
* ``boxlite_registry`` — the :class:`PluginRegistry` the backend is looked up in (default:
  every installed entry point), e.g. to add a test-only plugin object;
* ``conformance_requirements`` — a :class:`Requirements` (subclass it to close a group).

Gates run in an autouse fixture, before any box is asked for, so a test closed by a capability
never boots a VM; tier >= 1 tests also need an available backend and an importable runtime
(skipped with the probe's reason, or failed under ``--conformance-strict``). Last, a test's
named host requirements (``needs_host``, see ``requirements.HOST_REQUIREMENTS``) are checked
with its parameters: skipped naming the requirement and why (failed under strict for the
ones a certified host should meet, e.g. virtiofsd installed when 'virtiofs' is declared).
A test ``limited_by`` a limitation its sharer declares runs as a strict xfail on
AssertionError: reported "limited" when it fails as declared, failed when it passes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from boxlite_core.errors import NotFoundError
from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.base import VmmBackend
from boxlite_core.vmm.spec import Capability, ProbeResult

from . import report as report_mod
from .boxes import BoxPool, conformance_home, import_runtime
from .markers import (
    FIRST_VM_TIER,
    HOST_MARK,
    LIMITATION_MARK,
    REQUIRES_MARK,
    TIER_MARK,
    TIERS,
    item_capabilities,
    item_capability_text,
    item_host_requirements,
    item_limitations,
    item_requirements,
    item_tier,
)
from .requirements import HOST_REQUIREMENTS, Requirements

if TYPE_CHECKING:
    from .networld import World

ENV_BACKEND = "BOXLITE_CONFORMANCE_BACKEND"

_state_key = pytest.StashKey["RunState"]()


class RunState:
    """What the run learnt, for the report: the backend, and every test's outcome."""

    def __init__(self) -> None:
        self.backend: str | None = None
        self.plugin: str | None = None
        self.capabilities: list[str] | None = None
        self.probe: dict[str, Any] | None = None
        self.plugin_failures: list[dict[str, str]] = []
        self.items: dict[str, dict[str, Any]] = {}
        self.started = time.time()


def _state(config: pytest.Config) -> RunState:
    if _state_key not in config.stash:
        config.stash[_state_key] = RunState()
    return config.stash[_state_key]


# -- options and marks ---------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("boxlite-conformance")
    group.addoption(
        "--boxlite-backend",
        default=os.environ.get(ENV_BACKEND),
        help=f"registry name of the VMM backend under test (default: ${ENV_BACKEND})",
    )
    group.addoption(
        "--conformance-max-tier",
        type=int,
        default=None,
        help="run conformance tiers 0..N only (0: no VM)",
    )
    group.addoption(
        "--conformance-report",
        default=None,
        metavar="DIR",
        help="write DIR/<backend>.json and DIR/<backend>.md at the end of the run",
    )
    group.addoption(
        "--conformance-strict",
        action="store_true",
        default=False,
        help="fail (not skip) VM tiers when the backend or runtime is unavailable here",
    )
    group.addoption(
        "--conformance-list",
        default=None,
        metavar="FILE",
        help="write the collected tests with tiers and capabilities as JSON to FILE",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{TIER_MARK}(level): boxlite conformance tier 0..3 ({TIERS[0]} ... )"
    )
    config.addinivalue_line(
        "markers",
        f"{REQUIRES_MARK}(*capabilities, any_of=False): skip unless the backend declares them",
    )
    config.addinivalue_line(
        "markers", f"{HOST_MARK}(*names): skip unless these named host requirements hold"
    )
    config.addinivalue_line(
        "markers", f"{LIMITATION_MARK}(name): expected to fail where the test's volume sharer "
        "declares this limitation"
    )
    config.addinivalue_line("markers", "vm: boots a real VM (slow under TCG)")
    _state(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _group_by_box(items)
    max_tier = config.getoption("--conformance-max-tier")
    if max_tier is None:
        return
    keep, drop = [], []
    for item in items:
        level = item_tier(item)
        (drop if level is not None and level > max_tier else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _group_by_box(items: list[pytest.Item]) -> None:
    """Make each shared box's tests contiguous: a class naming ``conformance_group_by``
    (e.g. "strategy") has its tests ordered by that parameter, so a box per value boots once.
    """
    first_seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault((getattr(item, "module", None), getattr(item, "cls", None)), index)

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, str, int]:
        index, item = pair
        cls = getattr(item, "cls", None)
        group = first_seen[(getattr(item, "module", None), cls)]
        param = getattr(cls, "conformance_group_by", None)
        value = ""
        if param and hasattr(item, "callspec"):
            value = str(item.callspec.params.get(param, ""))
        return (group, value, index)

    items[:] = [item for _i, item in sorted(enumerate(items), key=key)]


def pytest_collection_finish(session: pytest.Session) -> None:
    state = _state(session.config)
    for item in session.items:
        level = item_tier(item)
        if level is None:
            continue
        state.items[item.nodeid] = {
            "nodeid": item.nodeid,
            "test": _short_name(item),
            "tier": level,
            "capabilities": item_capabilities(item),
            "host_requirements": item_host_requirements(item),
            "limitations": item_limitations(item),
            "requires": item_capability_text(item),
            "outcome": "not run",
            "duration": 0.0,
            "message": "",
        }
    path = session.config.getoption("--conformance-list")
    if path:
        Path(path).write_text(json.dumps(list(state.items.values()), indent=2))


def _short_name(item: pytest.Item) -> str:
    """``TestClass::test_name[param]`` — stable across the file the suite was imported into."""
    parts = item.nodeid.split("::")
    return "::".join(parts[1:]) if len(parts) > 1 else item.nodeid


# -- recording outcomes --------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    entry = _state(item.config).items.get(item.nodeid)
    if entry is None:
        return report
    entry["duration"] = round(entry["duration"] + report.duration, 3)
    if report.when == "setup":
        if report.skipped:
            entry["outcome"], entry["message"] = "skipped", _skip_reason(report)
        elif report.failed:
            entry["outcome"], entry["message"] = "error", _failure_line(report)
    elif report.when == "call":
        if report.passed:
            entry["outcome"] = "passed"
        elif hasattr(report, "wasxfail"):  # failed as a declared limitation says it does
            entry["outcome"], entry["message"] = "limited", str(report.wasxfail)
        elif report.skipped:
            entry["outcome"], entry["message"] = "skipped", _skip_reason(report)
        else:
            entry["outcome"], entry["message"] = "failed", _failure_line(report)
    elif report.when == "teardown" and report.failed and entry["outcome"] == "passed":
        entry["outcome"], entry["message"] = "error", _failure_line(report)
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _failure_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else "failed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    directory = session.config.getoption("--conformance-report")
    if not directory:
        return
    state = _state(session.config)
    data = report_mod.build(
        backend=state.backend or session.config.getoption("--boxlite-backend") or "unknown",
        plugin=state.plugin,
        capabilities=state.capabilities,
        probe=state.probe,
        plugin_failures=state.plugin_failures,
        tests=list(state.items.values()),
        duration=time.time() - state.started,
    )
    report_mod.write(Path(directory), data)


# -- fixtures a vendor may override ---------------------------------------------------------


@pytest.fixture(scope="session")
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test. Override this fixture, or pass ``--boxlite-backend NAME``."""
    name = request.config.getoption("--boxlite-backend")
    if not name:
        raise pytest.UsageError(
            "boxlite-conformance: name the backend under test with --boxlite-backend NAME, "
            f"${ENV_BACKEND}, or a `backend_name` fixture in your conftest.py"
        )
    return name


@pytest.fixture(scope="session")
def boxlite_registry() -> PluginRegistry:
    """Every installed boxlite plugin (entry points). Override to add a test-only plugin."""
    return PluginRegistry()


@pytest.fixture(scope="session")
def backend(
    request: pytest.FixtureRequest, boxlite_registry: PluginRegistry, backend_name: str
) -> VmmBackend:
    """The backend instance, looked up by name exactly as the runtime would."""
    state = _state(request.config)
    state.backend = backend_name
    state.plugin_failures = [f.to_dict() for f in boxlite_registry.failures]
    try:
        instance = boxlite_registry.backend(backend_name)
    except NotFoundError as exc:
        broken = "; ".join(
            f"{f.plugin} ({f.where}): {f.error}" for f in boxlite_registry.failures
        )
        hint = f"; plugins that failed to load: {broken}" if broken else ""
        pytest.fail(f"{exc}{hint}", pytrace=False)
    state.plugin = boxlite_registry.backend_plugin(backend_name)
    try:
        state.capabilities = sorted(str(getattr(c, "value", c)) for c in instance.capabilities())
    except Exception as exc:  # the T0 test reports it properly
        state.capabilities = [f"<capabilities() raised {type(exc).__name__}>"]
    state.probe = _probe(instance).to_dict()
    return instance


def _probe(backend: VmmBackend) -> ProbeResult:
    """The backend's probe, coerced: raising or returning the wrong type means unavailable
    (for gating and the report; the T0 probe tests fail on it by name)."""
    try:
        result = backend.probe()
    except Exception as exc:
        return ProbeResult(False, reason=f"probe() raised {type(exc).__name__}: {exc}")
    if not isinstance(result, ProbeResult):
        return ProbeResult(
            False, reason=f"probe() returned {type(result).__name__}, not a ProbeResult"
        )
    return result


@pytest.fixture(scope="session")
def backend_capabilities(backend: VmmBackend) -> frozenset[Capability]:
    """The declared capabilities, as Capability members (unknown values are dropped here;
    the T0 contract test fails on them)."""
    try:
        caps = backend.capabilities()
    except Exception:
        return frozenset()
    return frozenset(c for c in caps if isinstance(c, Capability))


@pytest.fixture(scope="session")
def backend_probe(backend: VmmBackend) -> ProbeResult:
    """The probe the VM tiers are gated on."""
    return _probe(backend)


@pytest.fixture(scope="session")
def conformance_requirements(
    backend_name: str,
    backend_capabilities: frozenset[Capability],
    boxlite_registry: PluginRegistry,
    backend: VmmBackend,
) -> Requirements:
    where = getattr(backend, "remote_host", "")
    return Requirements(backend_name, backend_capabilities, boxlite_registry,
                        remote_host=where if isinstance(where, str) else "")


@pytest.fixture(scope="session")
def box_pool(backend_name: str, boxlite_registry: PluginRegistry) -> Iterator[BoxPool]:
    """Lazily booted boxes shared by the VM tiers; everything is removed at session end."""
    pool = BoxPool(backend_name, conformance_home(), boxlite_registry)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The T2 network tests' outside world (networld.World), its hosts file in
    BOXLITE_NET_HOSTS while it exists (the relays the boxes start inherit it)."""
    from .networld import World

    hosts = tmp_path_factory.mktemp("networld") / "hosts"
    with World(tag=f"c{os.getpid() % 10000}", hosts_file=hosts) as made:
        made.serve(8080)
        made.serve(8081)
        made.serve_dns(5353)
        previous = os.environ.get("BOXLITE_NET_HOSTS")
        os.environ["BOXLITE_NET_HOSTS"] = str(hosts)
        try:
            yield made
        finally:
            if previous is None:
                os.environ.pop("BOXLITE_NET_HOSTS", None)
            else:
                os.environ["BOXLITE_NET_HOSTS"] = previous


@pytest.fixture
def runtime(box_pool: BoxPool) -> Any:
    return box_pool.runtime


@pytest.fixture
def box(box_pool: BoxPool, conformance_requirements: Requirements) -> Any:
    """The shared default box: started once, never stopped by a test."""
    return box_pool.default_box(conformance_requirements.default_rootfs)


# -- the gate ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _conformance_gate(request: pytest.FixtureRequest) -> None:
    item = request.node
    level = item_tier(item)
    if level is None:
        return
    requirements: Requirements = request.getfixturevalue("conformance_requirements")
    for caps, any_of in item_requirements(item):
        reason = requirements.closed_reason(caps, any_of)
        if reason:
            pytest.skip(reason)
    strict = request.config.getoption("--conformance-strict")
    if level >= FIRST_VM_TIER:
        name = requirements.backend_name
        probe: ProbeResult = request.getfixturevalue("backend_probe")
        if not probe.available:
            fix = f" (fix: {probe.fix})" if probe.fix else ""
            _close(strict, f"backend {name!r} is not available on this host: {probe.reason}{fix}")
        try:
            import_runtime()
        except ImportError as exc:
            _close(strict, f"the boxlite runtime cannot be imported ({exc}); VM tiers need it")
    params = getattr(getattr(item, "callspec", None), "params", {})
    for host in item_host_requirements(item):
        reason = requirements.host_unmet(host, params)
        if reason:
            _close(strict and HOST_REQUIREMENTS[host].strict, reason)
    for name in item_limitations(item):
        reason = requirements.declared_limitation(name, params)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError))


def _close(strict: bool, reason: str) -> None:
    if strict:
        pytest.fail(f"{reason} [--conformance-strict]", pytrace=False)
    pytest.skip(reason)
