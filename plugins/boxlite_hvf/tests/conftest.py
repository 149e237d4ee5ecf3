"""Fixtures for the hvf backend tests: a VmSpec with every kind of device, built in tmp_path
(the builder is hvf_specs.make_spec)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hvf_specs import make_spec

from boxlite_core.vmm.spec import VmSpec


@pytest.fixture
def spec(tmp_path: Path) -> VmSpec:
    return make_spec(tmp_path)
