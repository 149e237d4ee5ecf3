"""Small static C programs the suite puts in a guest, for what busybox cannot do.

Built on the host at test time, never a binary in git; static, so they run in any image. A
host without a C compiler and a static libc (Debian: gcc, libc6-dev) gets None, and the
checks that need the program are left out with that reason; the others still run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: what a missing helper is reported as (the Debian packages that bring a static C toolchain)
NO_COMPILER = "no C compiler with a static libc on this host (Debian: gcc, libc6-dev)"


def build_static_helper(source: str, where: Path, name: str) -> Path | None:
    """Compile C ``source`` statically to ``where/name``; None when it cannot be built
    (no gcc/cc, no static libc, or the compiler took longer than 120 s)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    (where / f"{name}.c").write_text(source)
    try:
        subprocess.run(
            [gcc, "-static", "-O1", "-o", str(where / name), str(where / f"{name}.c")],
            check=True, timeout=120, capture_output=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return where / name
