"""Where the suite's runtime homes are, and names that do not collide in a shared one.

The shared home (BOXLITE_TEST_HOME, default /var/tmp/boxlite-test-home) keeps the guest kit
and the built-in images across runs, so VM tests build them once; fast tests use a fresh home
under tmp_path instead. BOXLITE_HOME is the runtime's own variable (what the CLI reads): tests
set it for a subprocess, never for the suite.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: the repository root (this package sits in it): the agent's code for native runs
REPO = Path(__file__).resolve().parents[1]
#: the variable naming the shared home; empty or unset: DEFAULT_SHARED_HOME
SHARED_HOME_ENV = "BOXLITE_TEST_HOME"
DEFAULT_SHARED_HOME = Path("/var/tmp/boxlite-test-home")
#: the shared test home, read once at import (the ``shared_home`` fixture creates it)
SHARED_HOME = Path(os.environ.get(SHARED_HOME_ENV) or DEFAULT_SHARED_HOME)


def unique(prefix: str) -> str:
    """A box name no other run in the shared home uses: ``prefix-`` plus 6 hex digits."""
    return f"{prefix}-{secrets.token_hex(3)}"
