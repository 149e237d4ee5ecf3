"""Reading ext4 images without mounting them (debugfs)."""

from __future__ import annotations

from pathlib import Path


def debugfs(image: Path, request: str) -> str:
    import subprocess

    from boxlite_core.tools import require_tool

    out = subprocess.run(
        [require_tool("debugfs"), "-R", request, str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout
