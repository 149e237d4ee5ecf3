"""Running the real ``boxlite`` command from a test: a subprocess of this interpreter.

A subprocess, not click's CliRunner: the CLI's contract is about the process (one error line
on stderr, exit codes, signals, a closed stdout), which only a real process shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: argv of the ``boxlite`` command under this interpreter (the installed script may be stale)
BOXLITE = [sys.executable, "-m", "boxlite_core.cli.main"]


def boxlite_env(home: Path) -> dict[str, str]:
    """This process's environment for a ``boxlite`` on ``home``, without BOXLITE_DEBUG (its
    tracebacks would break the one-error-line contract the tests check)."""
    env = dict(os.environ)
    env["BOXLITE_HOME"] = str(home)
    env.pop("BOXLITE_DEBUG", None)
    return env


def boxlite(
    *args: str, env: dict[str, str] | None = None, home: Path, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """``boxlite ARGS…`` on ``home``, output captured as text, bounded at 120 s.

    ``env`` adds to ours; BOXLITE_DEBUG is always dropped, and unless ``env`` names
    BOXLITE_PLUGINS, ours is dropped too (a test that sets up plugins says which load)."""
    full = {**os.environ, "BOXLITE_HOME": str(home), **(env or {})}
    full.pop("BOXLITE_DEBUG", None)
    if env and "BOXLITE_PLUGINS" not in env:
        full.pop("BOXLITE_PLUGINS", None)
    return subprocess.run(
        [*BOXLITE, *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
