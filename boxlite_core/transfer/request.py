"""What the user asked the guest for, and what the result is called (docker ``cp`` rules).

Why here and not in the archive: the archive comes from the guest. A request for ``/x`` must
produce a file or directory named ``x`` on the host (or the name the user typed), never
whatever the guest put at the top of the tar (``.ssh/authorized_keys``). The agent is asked
for ``guest_path`` and must put exactly one top entry, ``name``, in its archive; anything
else is refused by :mod:`.untar`.
"""

from __future__ import annotations

import posixpath

import attrs

from ..errors import ConfigError

#: the archive's top name when the contents of a directory are asked for (``/dir/.``)
CONTENTS = "."


@attrs.frozen
class OutRequest:
    """One copy-out request.

    ``guest_path``: the absolute path sent to the agent (normalised; a trailing ``/`` kept,
    it asks the guest to follow a symlink there, like docker). ``name``: the top entry the
    archive must have and the result's default name (``"."`` when ``contents``).
    ``contents``: ``/dir/.`` or ``/``: copy what is *in* the directory, not the directory.
    """

    guest_path: str
    name: str
    contents: bool


def parse_guest_path(path: str) -> OutRequest:
    """Parse ``path`` as typed after ``BOX:``; raises ConfigError for a relative path."""
    if not path.startswith("/"):
        raise ConfigError(f"copy: guest path {path!r} must be absolute (BOX:/path)")
    if "\x00" in path:
        raise ConfigError(f"copy: guest path {path!r} contains a NUL byte")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    contents = path.endswith("/.") or norm == "/"
    if contents:
        return OutRequest(guest_path=norm.rstrip("/") + "/.", name=CONTENTS, contents=True)
    name = posixpath.basename(norm)
    guest_path = norm + "/" if path.endswith("/") else norm
    return OutRequest(guest_path=guest_path, name=name, contents=False)


__all__ = ["CONTENTS", "OutRequest", "parse_guest_path"]
