"""boxlite-conformance: the shared suite every boxlite VMM backend runs.

A vendor's whole integration is two files (see the README)::

    # conftest.py
    pytest_plugins = ["boxlite_conformance.plugin"]

    # test_conformance.py
    from boxlite_conformance.suite import *  # noqa: F403

and a backend name (``--boxlite-backend NAME`` or a ``backend_name`` fixture). Tests are
tiered (``conformance_tier(0..3)``) and gated on the backend's declared capabilities with
:func:`requires`, so a backend is only ever held to what it says it can do.
"""

from __future__ import annotations

from .markers import REQUIRES_MARK, TIER_MARK, requires, tier
from .requirements import Requirements

__version__ = "0.1.0"

__all__ = ["REQUIRES_MARK", "TIER_MARK", "Requirements", "__version__", "requires", "tier"]
