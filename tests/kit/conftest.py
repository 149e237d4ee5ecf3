"""Fixtures for the guest kit tests: a placeholder agent tree to hash and build from.

The real kit of this repository (``built_kit``, built once into the shared test home) is a
fixture of boxlite_testing.plugin, shared with the libvirt tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PLACEHOLDER_AGENT = b'''"""Placeholder guest agent for the kit tests: say so and power off."""
import ctypes
import os

print("placeholder-agent: pid", os.getpid(), flush=True)
os.sync()
ctypes.CDLL(None).reboot(0x4321FEDC)
'''


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
