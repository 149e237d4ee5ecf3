"""Reading boxlite's numeric environment settings (timeouts, size margins) one way.

Why one reader: each bound (boot, agent transfers, external programs, QMP, libvirt) can be
raised by an environment variable on a slow host, and a typo there must fail loudly with the
variable's name — silently falling back to the default would leave the user wondering why their
setting had no effect.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .errors import ConfigError


def seconds(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """``name``'s value as a number of seconds (> 0, finite), or ``default`` when unset/empty.

    Raises ConfigError naming the variable when it is set to anything else.
    """
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={raw!r}: must be a number of seconds above 0; unset it for "
                          f"the default ({default:g})")
    return value


def mebibytes(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    """``name``'s value as a whole number of MiB (>= 0), or ``default`` when unset/empty.

    Raises ConfigError naming the variable when it is set to anything else.
    """
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: must be a whole number of MiB, 0 or more; unset it "
                          f"for the default ({default})")
    return value
