"""boxlite-conformance: the shared suite every boxlite VMM backend runs.

A vendor's whole integration is two files (see the README)::

    # conftest.py
    pytest_plugins = ["boxlite_conformance.plugin"]

    # test_conformance.py
    from boxlite_conformance.suite import *  # noqa: F403

and a backend name (``--boxlite-backend NAME`` or a ``backend_name`` fixture). Tests are
tiered (``conformance_tier(0..3)``) and gated on the backend's declared capabilities with
:func:`requires` (and on named host requirements with :func:`needs_host`), so a backend is
only ever held to what it says it can do; a test a volume sharer's declared limitation
covers (:func:`limited_by`) is expected to fail for that sharer.
"""

from __future__ import annotations

from .markers import (
    HOST_MARK,
    LIMITATION_MARK,
    REQUIRES_MARK,
    TIER_MARK,
    limited_by,
    needs_host,
    requires,
    tier,
)
from .requirements import HOST_REQUIREMENTS, HostRequirement, Requirements

__version__ = "0.1.0"

__all__ = [
    "HOST_MARK",
    "HOST_REQUIREMENTS",
    "LIMITATION_MARK",
    "REQUIRES_MARK",
    "TIER_MARK",
    "HostRequirement",
    "Requirements",
    "__version__",
    "limited_by",
    "needs_host",
    "requires",
    "tier",
]
