"""Waiting for an event in a test: poll a check until it holds, bounded.

The bound is a limit on a wait, never a timing assertion (speed lives in bench/).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], limit: float, interval: float = 0.05) -> T:
    """Call ``check`` every ``interval`` s until it returns something truthy and return that;
    AssertionError naming ``what`` and the limit after ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}")
        time.sleep(interval)
