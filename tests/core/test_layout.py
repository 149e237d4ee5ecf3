"""The tree's layout rules, checked from the code's own imports (docs/layout.md explains them).

A rule written only in a document drifts; these fail the build the day someone adds an import
that breaks one: a core module reaching into a plugin, host code creeping into the guest's
packages, or two modules importing each other round a circle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "boxlite_core"
PLUGIN_PACKAGES = ("boxlite_qemu", "boxlite_libkrun", "boxlite_hvf", "boxlite_conformance")
#: what the guest root holds besides the stdlib (kit/guestroot.py installs these wheels)
GUEST_THIRD_PARTY = ("grpc", "google.protobuf")
#: the packages that run in the guest (kit/builder.py GUEST_PACKAGES)
GUEST_PACKAGES = ("boxlite_core.agent", "boxlite_core.proto")


def module_name(path: Path) -> str:
    rel = path.relative_to(CORE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for p in sorted(CORE.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Absolute module names ``path`` imports (at any depth: a lazy import is still a tie),
    with their line numbers. ``from pkg import mod`` yields ``pkg.mod`` when that is a
    module of the tree, else ``pkg``."""
    known = core_modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def core_graph() -> dict[str, set[str]]:
    """Module → the core modules it imports. A package's ``__init__`` that only hands names
    on is skipped as a source of ties (importing ``pkg.mod`` runs it, but it is a face, not
    a room)."""
    known = core_modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        if path.name == "__init__.py" and name != "boxlite_core":
            continue
        targets = set()
        for target, _line in imports_of(name, path):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "boxlite_core":
                if known[target].name == "__init__.py":
                    continue
                targets.add(target)
        graph[name] = targets
    graph.pop("boxlite_core", None)  # its lazy __getattr__ exports name the public classes
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_the_core() -> None:
    found = circles(core_graph())
    assert not found, "modules that import each other round a circle: " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_no_core_module_imports_a_plugin() -> None:
    bad = [
        f"{name}:{line} imports {target}"
        for name, path in core_modules().items()
        for target, line in imports_of(name, path)
        if target.split(".")[0] in PLUGIN_PACKAGES
    ]
    assert not bad, "the core must not depend on a plugin: " + ", ".join(bad)


@pytest.mark.parametrize("package", GUEST_PACKAGES)
def test_guest_code_imports_only_what_the_guest_has(package: str) -> None:
    """The guest root holds the stdlib, grpc, protobuf and the guest packages, nothing else of
    boxlite_core: an import of host code would fail at boot, inside the VM."""
    stdlib = sys.stdlib_module_names
    bad = []
    for name, path in core_modules().items():
        if not (name == package or name.startswith(package + ".")):
            continue
        for target, line in imports_of(name, path):
            top = target.split(".")[0]
            if top in stdlib or top == "__future__":
                continue
            if any(target == t or target.startswith(t + ".") for t in GUEST_THIRD_PARTY):
                continue
            if any(target == g or target.startswith(g + ".") for g in GUEST_PACKAGES):
                continue
            bad.append(f"{name}:{line} imports {target}")
    assert not bad, "guest code imports what the guest root lacks: " + ", ".join(bad)


def test_host_channel_and_guest_agent_share_only_the_protocol() -> None:
    """``channel/`` (host) and ``agent/`` (guest) meet only in ``proto/``."""
    bad = []
    for name, path in core_modules().items():
        for side, other in (("boxlite_core.channel", "boxlite_core.agent"),
                            ("boxlite_core.agent", "boxlite_core.channel")):
            if name.startswith(side):
                bad += [f"{name}:{line} imports {t}" for t, line in imports_of(name, path)
                        if t.startswith(other)]
    assert not bad, ", ".join(bad)


def test_the_rules_can_fail() -> None:
    """The circle finder finds a circle (so a green run means something)."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
