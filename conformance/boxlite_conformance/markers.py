"""The two marks every conformance test carries: its tier and the capabilities it needs.

Marks, not fixtures, so ``boxlite-conformance list`` and the report can read a test's tier
and capabilities at collection time, without a backend or a VM.
"""

from __future__ import annotations

import pytest

from boxlite_core.vmm.spec import Capability

TIER_MARK = "conformance_tier"
REQUIRES_MARK = "conformance_requires"
HOST_MARK = "conformance_host"
LIMITATION_MARK = "conformance_limitation"

#: tier → what it proves; tiers >= 1 boot VMs
TIERS = {
    0: "contract: no VM (identity, capabilities, probe, plan, attach)",
    1: "boot and exec: exit codes, stdout/stderr, stdin, signals, stop, in-guest resources",
    2: "storage and network: rootfs strategies, volumes through each sharer, copy in/out, "
       "network policy and published ports",
    3: "lifecycle faults: VM death, restart, reattach from another process, pause/snapshot",
}
#: the lowest tier whose tests need a running VM (and so an available backend + runtime)
FIRST_VM_TIER = 1


def tier(level: int) -> pytest.MarkDecorator:
    """Mark a test (or class) as belonging to conformance tier ``level`` (0..3)."""
    if level not in TIERS:
        raise ValueError(f"conformance tier must be one of {sorted(TIERS)}, got {level!r}")
    return getattr(pytest.mark, TIER_MARK)(level)


def requires(*capabilities: Capability, any_of: bool = False) -> pytest.MarkDecorator:
    """Run the test only if the backend declares every capability (or one, with ``any_of``).

    A closed test is skipped with the capability's name, e.g.
    ``backend 'x' does not declare capability 'virtiofs'``.
    """
    caps = tuple(Capability(c) for c in capabilities)
    if not caps:
        raise ValueError("requires() needs at least one Capability")
    return getattr(pytest.mark, REQUIRES_MARK)(*caps, any_of=any_of)


def needs_host(*names: str) -> pytest.MarkDecorator:
    """Run the test only where the named host requirements hold
    (:data:`~boxlite_conformance.requirements.HOST_REQUIREMENTS`: e.g. "auto-idmap",
    "sharer-on-host"); they are checked with the test's parameters (e.g. ``sharer``).

    Raises:
        ValueError: no name given.
    """
    if not names:
        raise ValueError("needs_host() needs at least one requirement name")
    return getattr(pytest.mark, HOST_MARK)(*names)


def limited_by(name: str) -> pytest.MarkDecorator:
    """The test checks a behaviour a volume sharer may declare it lacks
    (:class:`~boxlite_core.volumes.base.Limitation` ``name``, e.g. "open-unlinked-fd"). For
    the test's ``sharer`` when it declares it, the test is expected to fail an assertion
    (strict xfail, reported as "limited"): passing there means the declaration is stale, and
    fails the run; any other error is still a failure. Elsewhere it must pass.
    """
    return getattr(pytest.mark, LIMITATION_MARK)(name)


def item_limitations(item: pytest.Item) -> list[str]:
    """The limitation names on the item (:func:`limited_by`)."""
    seen: list[str] = []
    for mark in item.iter_markers(LIMITATION_MARK):
        seen += [str(n) for n in mark.args if str(n) not in seen]
    return seen


def item_host_requirements(item: pytest.Item) -> list[str]:
    """The host requirement names on the item (class, function and parameter marks)."""
    seen: list[str] = []
    for mark in item.iter_markers(HOST_MARK):
        seen += [str(n) for n in mark.args if str(n) not in seen]
    return seen


def item_tier(item: pytest.Item) -> int | None:
    mark = item.get_closest_marker(TIER_MARK)
    return int(mark.args[0]) if mark is not None else None


def item_requirements(item: pytest.Item) -> list[tuple[tuple[Capability, ...], bool]]:
    """Every requires() on the item (class, function and parameter marks): (caps, any_of)."""
    return [
        (tuple(Capability(c) for c in m.args), bool(m.kwargs.get("any_of", False)))
        for m in item.iter_markers(REQUIRES_MARK)
    ]


def item_capabilities(item: pytest.Item) -> list[str]:
    """The capability names a test needs, flattened and ordered, for lists and reports."""
    seen: list[str] = []
    for caps, _any in item_requirements(item):
        for cap in caps:
            if cap.value not in seen:
                seen.append(cap.value)
    return seen


def item_capability_text(item: pytest.Item) -> str:
    """Human form for ``list``: ``qcow2, 9p|virtiofs`` (``|`` joins an any_of group)."""
    groups = [("|" if any_of else ", ").join(c.value for c in caps)
              for caps, any_of in item_requirements(item)]
    hosts = [f"host:{name}" for name in item_host_requirements(item)]
    return ", ".join([*reversed(groups), *hosts]) or "-"
