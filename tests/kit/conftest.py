"""Fixtures for the guest kit tests: a placeholder agent tree and a shared, cached kit home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PLACEHOLDER_AGENT = b'''"""Placeholder guest agent for the kit tests: say so and power off."""
import ctypes
import os

print("placeholder-agent: pid", os.getpid(), flush=True)
os.sync()
ctypes.CDLL(None).reboot(0x4321FEDC)
'''

REPO = Path(__file__).resolve().parents[2]


def make_source_tree(root: Path, agent_main: bytes = PLACEHOLDER_AGENT) -> Path:
    """A minimal `boxlite_core/{agent,proto}` tree the kit can be built from."""
    guest = root / "boxlite_core"
    (guest / "agent").mkdir(parents=True, exist_ok=True)
    (guest / "proto").mkdir(parents=True, exist_ok=True)
    (root / "boxlite_core" / "__init__.py").write_text("import attrs  # host-only\n")
    (guest / "agent" / "__init__.py").write_text("")
    (guest / "agent" / "__main__.py").write_bytes(agent_main)
    (guest / "proto" / "__init__.py").write_text("")
    return root


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    return make_source_tree(tmp_path / "src")


@pytest.fixture(scope="session")
def kit_home() -> Path:
    """BOXLITE_TEST_HOME, else a fixed dir under /var/tmp so reruns reuse the kit cache."""
    home = Path(os.environ.get("BOXLITE_TEST_HOME", "/var/tmp/boxlite-test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def kit_source_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo when its agent is runnable, else a placeholder tree (agent not written yet)."""
    if (REPO / "boxlite_core" / "guest" / "agent" / "__main__.py").is_file():
        return REPO
    return make_source_tree(tmp_path_factory.mktemp("kit-src"))


@pytest.fixture(scope="session")
def built_kit(kit_home: Path, kit_source_root: Path):
    from boxlite_core.kit import ensure_kit

    return ensure_kit(kit_home, source_root=kit_source_root)
