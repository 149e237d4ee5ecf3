"""The Runtime a command works on: each call to :func:`runtime` opens a new one.

``factory`` is the one seam for replacing it (a test runs the real CLI over a Runtime built
with a double, e.g. a kit provider that fails on purpose): every command calls
:func:`runtime`, which looks ``factory`` up at call time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.runtime import Runtime


def default_factory() -> Runtime:
    """A Runtime on the default home (BOXLITE_HOME or ~/.boxlite)."""
    from ..runtime.runtime import Runtime

    return Runtime()


#: builds the Runtime for a command; replace it before calling ``main()``
factory: Callable[[], Runtime] = default_factory


def runtime() -> Runtime:
    """The Runtime for this command, from ``factory``."""
    return factory()
