"""``boxlite_core.vendor`` is the one module a backend author imports from.

Checked from the code itself: every name it exports resolves, its docstring (the vendor's
map) mentions each one, and the example backends under conformance/examples/ import nothing
of boxlite_core except ``boxlite_core.vendor`` — if an example needs another name, it belongs
in the vendor module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import boxlite_core.vendor as vendor

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "conformance/examples").iterdir() if p.is_dir())


def test_every_exported_name_resolves() -> None:
    missing = [name for name in vendor.__all__ if not hasattr(vendor, name)]
    assert not missing, f"boxlite_core.vendor.__all__ names what it lacks: {missing}"
    assert len(set(vendor.__all__)) == len(vendor.__all__), "a name is exported twice"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from boxlite_core.vendor import *", namespace)  # the vendor's view
    assert set(namespace) - {"__builtins__"} == set(vendor.__all__)


def test_the_exports_are_the_cores_own_objects() -> None:
    """Re-exports only: each name is the object defined elsewhere in the core, no copy."""
    for name in vendor.__all__:
        obj = getattr(vendor, name)
        home = getattr(obj, "__module__", None)
        if home is None or not isinstance(home, str):
            continue  # constants and type aliases
        assert home != "boxlite_core.vendor", f"{name} is defined in vendor.py, not re-exported"
        if home.startswith("boxlite_core."):
            assert getattr(importlib.import_module(home), name, obj) is obj, name


def test_the_map_mentions_every_name() -> None:
    doc = vendor.__doc__ or ""
    unmentioned = [name for name in vendor.__all__ if name not in doc]
    assert not unmentioned, f"the vendor module's docstring does not explain: {unmentioned}"


def boxlite_imports(package: Path) -> list[str]:
    """``file:line module`` for every import of boxlite_core (or a submodule) in ``package``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "boxlite_core":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {module}")
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_backend_imports_only_the_vendor_module(example: Path) -> None:
    imports = boxlite_imports(example)
    assert imports, f"{example.name} imports nothing of boxlite_core: is this test looking " \
        "at the right directory?"
    other = [line for line in imports if not line.endswith(" boxlite_core.vendor")]
    assert not other, (
        f"{example.name} must import only from boxlite_core.vendor (a vendor's one module); "
        f"found: {', '.join(other)}"
    )


def test_every_name_the_package_exports_resolves() -> None:
    """``from boxlite_core import X`` for each advertised X: a lazy export pointing at a module
    the class has left (Capability, after the contract moved to vmm/spec.py) fails here."""
    import boxlite_core

    missing = []
    for name in boxlite_core.__all__:
        try:
            getattr(boxlite_core, name)
        except AttributeError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing
